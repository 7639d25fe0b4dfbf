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
      if (r.ok) r.body.entries.forEach(function (e) { row(tbody, [e.email, e.state, when(e.created_at)]); });
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
      if (r.ok) r.body.users.forEach(function (u) { row(tbody, [u.email, u.display_name, u.role]); });
    });
  }
  function all() { loadStats(); loadWaitlist(); loadInvites(); loadUsers(); }
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
    M.send("POST", "/api/admin/invites", { count: Number(f.count.value), uses: Number(f.uses.value), note: f.note.value }).then(function (r) {
      var pre = $("new-codes");
      pre.hidden = false;
      pre.textContent = r.ok ? r.body.codes.join("\n") : M.errorText(r.body);
      loadInvites();
    });
  });
  document.addEventListener("moss:lang", loadStats);
  all();
})();
