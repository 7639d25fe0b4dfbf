// moss pages: language choice and the forms on the landing, reset and admin pages.
// No inline script anywhere (the Content-Security-Policy forbids it).
(function () {
  "use strict";
  var root = document.documentElement;
  function setLang(lang) {
    root.setAttribute("data-lang", lang);
    root.setAttribute("lang", lang === "zh" ? "zh-CN" : "en");
    try { localStorage.setItem("moss.lang", lang); } catch (e) {}
  }
  var saved = null;
  try { saved = localStorage.getItem("moss.lang"); } catch (e) {}
  setLang(saved || ((navigator.language || "en").toLowerCase().indexOf("zh") === 0 ? "zh" : "en"));
  function lang() { return root.getAttribute("data-lang"); }

  // Light or dark: the system's choice until the switch is used, then the choice made.
  function setTheme(theme) {
    if (theme) root.setAttribute("data-theme", theme); else root.removeAttribute("data-theme");
  }
  var savedTheme = null;
  try { savedTheme = localStorage.getItem("moss.theme"); } catch (e) {}
  setTheme(savedTheme);
  function dark() {
    var t = root.getAttribute("data-theme");
    return t ? t === "dark" : window.matchMedia("(prefers-color-scheme: dark)").matches;
  }

  document.addEventListener("click", function (ev) {
    if (ev.target.closest("[data-action=toggle-theme]")) {
      var next = dark() ? "light" : "dark";
      setTheme(next);
      try { localStorage.setItem("moss.theme", next); } catch (e) {}
    }
    var t = ev.target.closest("[data-action=toggle-lang]");
    if (t) {
      setLang(lang() === "zh" ? "en" : "zh");
      document.dispatchEvent(new Event("moss:lang"));
    }
  });

  function say(form, text, isError) {
    var out = form.querySelector(".result");
    if (!out) return;
    out.textContent = text;
    out.classList.toggle("error", !!isError);
  }
  function errorText(body) {
    var e = body && body.error;
    if (!e) return lang() === "zh" ? "出错了，请重试。" : "Something went wrong, please try again.";
    return lang() === "zh" ? e.message_zh : e.message;
  }
  function send(method, url, data) {
    return fetch(url, {
      method: method,
      headers: { "Content-Type": "application/json" },
      credentials: "same-origin",
      body: data === undefined ? undefined : JSON.stringify(data)
    }).then(function (r) {
      return r.text().then(function (t) {
        var body = null;
        try { body = t ? JSON.parse(t) : null; } catch (e) {}
        return { ok: r.ok, status: r.status, body: body };
      });
    });
  }
  function fields(form) {
    var o = {};
    new FormData(form).forEach(function (v, k) { o[k] = v; });
    return o;
  }
  var params = new URLSearchParams(location.search);

  var handlers = {
    waitlist: function (form, f) {
      return send("POST", "/api/waitlist", { email: f.email, locale: lang() }).then(function (r) {
        if (!r.ok) return say(form, errorText(r.body), true);
        var b = r.body || {};
        if (b.mail) return say(form, lang() === "zh" ? "已收到！请查看邮箱确认。" : "Thank you! Check your inbox to confirm.");
        if (b.known) {
          return say(form, lang() === "zh" ? "这个邮箱已在候补名单上：请用登记时得到的链接查看排位。" : "This address is on the list already: use the link you got when you joined to see your place.");
        }
        // No mail here: the place in line, and the private link to keep.
        say(form, lang() === "zh" ? "你排在第 " + b.position + " 位。请保存这个私人链接，随时查看你的排位：" : "You are number " + b.position + " in line. Keep this private link to see your place at any time:");
        var a = document.createElement("a");
        a.href = b.status_url;
        a.className = "status-link";
        a.textContent = b.status_url;
        form.querySelector(".result").appendChild(document.createElement("br"));
        form.querySelector(".result").appendChild(a);
      });
    },
    register: function (form, f) {
      f.locale = lang();
      return send("POST", "/api/register", f).then(function (r) {
        if (r.ok) location.href = "/";
        else say(form, errorText(r.body), true);
      });
    },
    login: function (form, f) {
      return send("POST", "/api/login", f).then(function (r) {
        // Signed out on a conversation's page: back to it.
        if (r.ok) location.href = /^\/c\/\d+$/.test(location.pathname) ? location.pathname : "/";
        else say(form, errorText(r.body), true);
      });
    },
    forgot: function (form, f) {
      return send("POST", "/api/password/forgot", f).then(function (r) {
        if (r.body && r.body.mail === false) {
          return say(form, lang() === "zh" ? "本服务没有配置邮件：请向管理员索取重置链接。" : "This service sends no e-mail: ask its operator for a password-reset link.");
        }
        say(form, lang() === "zh" ? "如果该邮箱已注册，重置链接已发出。" : "If this address has an account, a reset link is on its way.");
      });
    },
    reset: function (form, f) {
      return send("POST", "/api/password/reset", { token: params.get("token") || "", password: f.password }).then(function (r) {
        if (r.ok) say(form, lang() === "zh" ? "密码已更新，所有设备均已退出，API 密钥也已撤销（可在设置中新建）。请重新登录。" : "Password changed. You are signed out everywhere and your API keys were revoked (make new ones in Settings). Please sign in again.");
        else say(form, errorText(r.body), true);
      });
    },
    logout: function () {
      return send("POST", "/api/logout").then(function () { location.href = "/"; });
    }
  };

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var name = form.getAttribute("data-form");
    if (!handlers[name]) return;
    ev.preventDefault();
    handlers[name](form, fields(form)).catch(function () {
      say(form, lang() === "zh" ? "网络错误，请重试。" : "Network error, please try again.", true);
    });
  });

  // Shared with chat.js and admin.js.
  window.moss = { send: send, lang: lang, say: say, errorText: errorText, setLang: setLang };

  var code = params.get("code");
  var codeInput = document.querySelector("[data-form=register] [name=invite_code]");
  if (code && codeInput) {
    codeInput.value = code;
    document.getElementById("register").scrollIntoView();
  }
})();
