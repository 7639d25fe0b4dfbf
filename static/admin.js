// moss admin page: waitlist and admission, invite codes, users, rating counts.
(function () {
  "use strict";
  var M = window.moss;
  function $(id) { return document.getElementById(id); }
  function row(tbody, cells) {
    var tr = document.createElement("tr");
    cells.forEach(function (c) {
      var td = document.createElement("td");
      if (c instanceof Node) td.appendChild(c); else td.textContent = c;
      tr.appendChild(td);
    });
    tbody.appendChild(tr);
  }
  function when(ms) { return ms ? new Date(ms).toLocaleString() : ""; }
  function zh() { return M.lang() === "zh"; }
  function button(en, cn, cls, onClick) {
    var b = document.createElement("button");
    b.type = "button";
    b.className = cls;
    b.textContent = zh() ? cn : en;
    b.addEventListener("click", onClick);
    return b;
  }
  // A link to hand over, shown once with a copy button.
  function showLink(text, url) {
    var box = $("row-result");
    box.textContent = "";
    box.hidden = false;
    box.appendChild(document.createTextNode(text + " "));
    var field = document.createElement("input");
    field.readOnly = true;
    field.value = url;
    field.className = "link-field";
    field.setAttribute("aria-label", text);
    box.appendChild(field);
    box.appendChild(button("Copy", "复制", "copy-link", function () {
      if (navigator.clipboard) navigator.clipboard.writeText(url);
    }));
  }
  function tell(text) {
    var box = $("row-result");
    box.hidden = false;
    box.textContent = text;
  }
  function loadStats() {
    M.send("GET", "/api/admin/stats").then(function (r) {
      if (!r.ok) return;
      var b = r.body;
      $("admin-stats").textContent = (M.lang() === "zh"
        ? "用户 " + b.users + " · 排队 " + b.waiting + " · ▲ " + b.ratings.up + " · ▼ " + b.ratings.down
        : "Users " + b.users + " · waiting " + b.waiting + " · ▲ " + b.ratings.up + " · ▼ " + b.ratings.down);
    });
  }
  function loadWaitlist() {
    M.send("GET", "/api/admin/waitlist").then(function (r) {
      var tbody = $("waitlist-table").querySelector("tbody");
      tbody.textContent = "";
      if (!r.ok) return;
      var find = $("waitlist-search").value.trim().toLowerCase();
      r.body.entries.filter(function (e) { return !find || e.email.indexOf(find) >= 0; }).forEach(function (e) {
        var actions = document.createElement("span");
        if (e.state === "waiting") {
          actions.appendChild(button("Admit", "放行", "admit-one", function () {
            M.send("POST", "/api/admin/waitlist/" + e.id + "/admit").then(function (r) {
              if (!r.ok) return tell(M.errorText(r.body));
              if (r.body.link) showLink(e.email + (zh() ? " 的邀请链接：" : ": invitation link"), r.body.link);
              else tell(zh() ? "邀请已发送到 " + e.email : "Invitation mailed to " + e.email);
              all();
            });
          }));
        }
        actions.appendChild(button("Remove", "移除", "remove-entry", function () {
          M.send("DELETE", "/api/admin/waitlist/" + e.id).then(all);
        }));
        row(tbody, [e.email, e.state, when(e.created_at), actions]);
      });
    });
  }
  function loadInvites() {
    M.send("GET", "/api/admin/invites").then(function (r) {
      var tbody = $("invites-table").querySelector("tbody");
      tbody.textContent = "";
      if (!r.ok) return;
      r.body.invites.forEach(function (i) {
        var cell = "";
        if (i.state === "active") {
          cell = document.createElement("button");
          cell.textContent = M.lang() === "zh" ? "撤销" : "Revoke";
          cell.className = "revoke";
          cell.addEventListener("click", function () {
            M.send("POST", "/api/admin/invites/" + i.id + "/revoke").then(loadInvites);
          });
        }
        row(tbody, [i.code_prefix + "…", i.state, i.uses + "/" + i.max_uses, i.note, cell]);
      });
    });
  }
  function loadUsers() {
    M.send("GET", "/api/admin/users").then(function (r) {
      var tbody = $("users-table").querySelector("tbody");
      tbody.textContent = "";
      if (!r.ok) return;
      var me = document.getElementById("admin-me").getAttribute("data-id");
      r.body.users.forEach(function (u) {
        var actions = document.createElement("span");
        var role = u.role;
        if (String(u.id) !== me) {
          var select = document.createElement("select");
          select.className = "role";
          select.setAttribute("aria-label", (zh() ? "角色：" : "Role: ") + u.email);
          ["user", "admin"].forEach(function (v) {
            var o = document.createElement("option");
            o.value = v; o.textContent = v; o.selected = v === u.role;
            select.appendChild(o);
          });
          select.addEventListener("change", function () {
            M.send("POST", "/api/admin/users/" + u.id + "/role", { role: select.value }).then(function (r) {
              tell(r.ok ? (zh() ? "已更改 " : "Changed ") + u.email : M.errorText(r.body));
            });
          });
          role = select;
          actions.appendChild(button("Reset link", "重置链接", "reset-link", function () {
            M.send("POST", "/api/admin/users/" + u.id + "/reset-link").then(function (r) {
              if (r.ok) showLink(u.email + (zh() ? " 的密码重置链接：" : ": password-reset link"), r.body.url);
              else tell(M.errorText(r.body));
            });
          }));
          // Two clicks: the first asks, in the button itself.
          actions.appendChild(button("Delete", "删除", "delete-user", function (ev) {
            var b = ev.currentTarget;
            if (!b.classList.contains("armed")) {
              b.classList.add("armed");
              b.textContent = zh() ? "确定删除 " + u.email + "？" : "Really delete " + u.email + "?";
              return;
            }
            M.send("DELETE", "/api/admin/users/" + u.id).then(function (r) {
              tell(r.ok ? (zh() ? "已删除 " : "Deleted ") + u.email : M.errorText(r.body));
              all();
            });
          }));
        }
        row(tbody, [u.email, u.display_name, role, actions]);
      });
    });
  }
  // The dashboard: charts drawn by the server (SVG of its own making, no user text in it).
  var range = "hour";
  function loadCharts() {
    M.send("GET", "/api/admin/dashboard?range=" + range).then(function (r) {
      var box = $("charts");
      if (!r.ok) return;
      var log = $("auto-log");
      log.textContent = "";
      var auto = r.body.auto_admission;
      if (!auto.enabled) {
        log.appendChild(Object.assign(document.createElement("li"), { textContent: zh() ? "未开启（waitlist.auto.enabled）。" : "Off (waitlist.auto.enabled)." }));
      }
      auto.log.forEach(function (d) {
        log.appendChild(Object.assign(document.createElement("li"), { textContent: when(d.at) + " — " + d.reason }));
      });
      box.textContent = "";
      r.body.charts.forEach(function (c) {
        var fig = document.createElement("figure");
        fig.className = "chart-card";
        fig.setAttribute("data-chart", c.id);
        var cap = document.createElement("figcaption");
        cap.textContent = (zh() ? c.title_zh : c.title_en) + " — " + (Math.round(c.summary * 100) / 100);
        fig.appendChild(cap);
        var holder = document.createElement("div");
        holder.innerHTML = c.svg; // made by the server from numbers and its own labels
        fig.appendChild(holder);
        box.appendChild(fig);
      });
    });
  }
  document.querySelectorAll("[data-range]").forEach(function (b) {
    b.addEventListener("click", function () {
      range = b.getAttribute("data-range");
      document.querySelectorAll("[data-range]").forEach(function (o) { o.classList.toggle("chosen", o === b); });
      loadCharts();
    });
  });
  setInterval(loadCharts, 30000);
  function all() { loadStats(); loadWaitlist(); loadInvites(); loadUsers(); loadCharts(); }
  $("waitlist-search").addEventListener("input", loadWaitlist);
  $("admit-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var form = ev.target;
    M.send("POST", "/api/admin/waitlist/admit", { count: Number(form.elements.count.value) }).then(function (r) {
      if (!r.ok) return M.say(form, M.errorText(r.body), true);
      var lines = r.body.admitted.map(function (a) { return a.code ? a.email + "  " + a.code : a.email; });
      M.say(form, (M.lang() === "zh" ? "已放行 " : "Admitted ") + lines.length + (lines.length ? ": " + lines.join(", ") : ""));
      all();
    });
  });
  $("invite-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var f = ev.target.elements;
    var body = { count: Number(f.count.value), uses: Number(f.uses.value), note: f.note.value };
    if (f.expires_in_days.value) body.expires_in_days = Number(f.expires_in_days.value);
    M.send("POST", "/api/admin/invites", body).then(function (r) {
      var box = $("new-codes");
      box.hidden = false;
      box.textContent = "";
      if (!r.ok) { box.textContent = M.errorText(r.body); return; }
      // Shown once (only a hash is kept): each code as the invitation link to hand out.
      r.body.codes.forEach(function (code) {
        var link = location.origin + "/register?code=" + encodeURIComponent(code);
        var line = document.createElement("div");
        var field = document.createElement("input");
        field.readOnly = true;
        field.value = link;
        field.className = "link-field invite-link";
        field.setAttribute("aria-label", zh() ? "邀请链接" : "Invitation link");
        line.appendChild(field);
        line.appendChild(button("Copy", "复制", "copy-link", function () {
          if (navigator.clipboard) navigator.clipboard.writeText(link);
        }));
        box.appendChild(line);
      });
      loadInvites();
    });
  });
  document.addEventListener("moss:lang", function () { loadStats(); loadCharts(); });
  all();
})();
