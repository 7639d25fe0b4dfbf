// moss chat: conversations, streamed answers (server-sent events over fetch), stop, regenerate,
// copy, ratings with comments, settings (consent, API keys). Answer HTML comes sanitised from the
// server; everything else is inserted as text.
(function () {
  "use strict";
  var M = window.moss;
  var T = {
    en: {
      untitled: "New chat", rename: "Rename", del: "Delete", confirmDelete: "Delete this conversation?",
      newTitle: "New title:", copy: "Copy", copied: "Copied", regenerate: "Regenerate", good: "Good answer",
      bad: "Bad answer", comment: "What was wrong or right? (optional)", send: "Send", thanks: "Thanks for the feedback.",
      queued: function (n) { return "You are number " + n + " in line…"; },
      cut: { length: "The answer was cut short (length limit).", cancelled: "The answer was stopped before it finished.",
             error: "The answer failed before it finished.", refused: "This request was declined." },
      network: "Network error, please try again.", empty: "Ask anything — in English or Chinese.",
      keyOnce: "Your new key (shown only once): ", revoke: "Revoke", noKeys: "No keys yet.",
      consentSaved: "Saved.", lastUsed: "last used", never: "never used", revoked: "revoked"
    },
    zh: {
      untitled: "新对话", rename: "重命名", del: "删除", confirmDelete: "删除这个对话？",
      newTitle: "新标题：", copy: "复制", copied: "已复制", regenerate: "重新生成", good: "回答得好",
      bad: "回答得不好", comment: "哪里好或不好？（可选）", send: "发送", thanks: "感谢你的反馈。",
      queued: function (n) { return "你排在第 " + n + " 位，请稍候…"; },
      cut: { length: "回答因长度限制被截断。", cancelled: "回答在完成前被停止。", error: "回答在完成前出错。", refused: "此请求已被拒绝。" },
      network: "网络错误，请重试。", empty: "用中文或英文问任何问题。",
      keyOnce: "新的密钥（只显示这一次）：", revoke: "撤销", noKeys: "还没有密钥。",
      consentSaved: "已保存。", lastUsed: "最近使用", never: "从未使用", revoked: "已撤销"
    }
  };
  function t(k) { return T[M.lang()][k]; }
  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  var state = { conversations: [], current: null, streaming: null };
  var list = $("conversations"), messages = $("messages"), prompt = $("prompt");

  // ---- views -------------------------------------------------------------------------------
  function show(view) {
    $("chat-view").hidden = view !== "chat";
    $("settings-view").hidden = view !== "settings";
    if (view === "settings") loadSettings();
    document.body.classList.remove("sidebar-open");
  }
  document.addEventListener("click", function (ev) {
    var v = ev.target.closest("[data-view]");
    if (v) show(v.getAttribute("data-view"));
  });
  $("toggle-sidebar").addEventListener("click", function () { document.body.classList.toggle("sidebar-open"); });

  // ---- conversations -----------------------------------------------------------------------
  function loadConversations() {
    return M.send("GET", "/api/conversations").then(function (r) {
      if (!r.ok) return;
      state.conversations = r.body.conversations;
      renderList();
    });
  }
  function renderList() {
    list.textContent = "";
    state.conversations.forEach(function (c) {
      var li = el("li", c.id === state.current ? "active" : "");
      li.setAttribute("data-id", c.id);
      var open = el("button", "conv-title", c.title || t("untitled"));
      open.addEventListener("click", function () { openConversation(c.id); });
      var rename = el("button", "conv-action", "✎");
      rename.title = t("rename");
      rename.addEventListener("click", function () {
        var title = window.prompt(t("newTitle"), c.title);
        if (title === null) return;
        M.send("PATCH", "/api/conversations/" + c.id, { title: title }).then(loadConversations);
      });
      var del = el("button", "conv-action", "×");
      del.title = t("del");
      del.addEventListener("click", function () {
        if (!window.confirm(t("confirmDelete"))) return;
        M.send("DELETE", "/api/conversations/" + c.id).then(function () {
          if (state.current === c.id) { state.current = null; messages.textContent = ""; }
          loadConversations();
        });
      });
      li.appendChild(open); li.appendChild(rename); li.appendChild(del);
      list.appendChild(li);
    });
  }
  function openConversation(id) {
    state.current = id;
    show("chat");
    renderList();
    return M.send("GET", "/api/conversations/" + id).then(function (r) {
      messages.textContent = "";
      if (!r.ok) return;
      r.body.messages.forEach(function (m, i) { appendMessage(m, i === r.body.messages.length - 1); });
      scrollDown();
    });
  }
  function newConversation() {
    return M.send("POST", "/api/conversations", {}).then(function (r) {
      state.current = r.body.id;
      messages.textContent = "";
      return loadConversations();
    });
  }
  $("new-chat").addEventListener("click", function () { newConversation().then(function () { show("chat"); prompt.focus(); }); });

  // ---- messages ----------------------------------------------------------------------------
  function scrollDown() { messages.scrollTop = messages.scrollHeight; }
  function cutNote(reason) {
    var text = reason && reason !== "stop" ? T[M.lang()].cut[reason] : null;
    return text ? el("p", "cut-note", text) : null;
  }
  function appendMessage(m, isLast) {
    var div = el("div", "message " + m.role);
    div.setAttribute("data-id", m.id || "");
    var body = el("div", "body");
    if (m.html !== undefined) body.innerHTML = m.html; // sanitised by the server
    else body.textContent = m.content;
    div.appendChild(body);
    if (m.role === "assistant") {
      var note = cutNote(m.finish_reason);
      if (note) div.appendChild(note);
      if (m.id) div.appendChild(answerTools(m, isLast));
    }
    messages.appendChild(div);
    return div;
  }
  function answerTools(m, isLast) {
    var tools = el("div", "tools");
    var copy = el("button", "copy", t("copy"));
    copy.addEventListener("click", function () {
      var done = function () { copy.textContent = t("copied"); };
      if (navigator.clipboard) navigator.clipboard.writeText(m.content).then(done, done); else done();
    });
    tools.appendChild(copy);
    if (isLast) {
      var regen = el("button", "regenerate", t("regenerate"));
      regen.addEventListener("click", function () { regenerate(m.id); });
      tools.appendChild(regen);
    }
    [[1, "▲", "good"], [-1, "▼", "bad"]].forEach(function (spec) {
      var b = el("button", spec[0] > 0 ? "rate-up" : "rate-down", spec[1] + " " + t(spec[2]));
      b.title = t(spec[2]);
      b.addEventListener("click", function () { rate(m.id, spec[0], tools); });
      tools.appendChild(b);
    });
    return tools;
  }
  function rate(id, rating, tools) {
    var old = tools.querySelector("form.feedback");
    if (old) old.remove();
    var form = el("form", "feedback");
    var input = el("input");
    input.name = "comment"; input.maxLength = 2000; input.placeholder = t("comment");
    var submit = el("button", "", t("send"));
    submit.type = "submit";
    form.appendChild(input); form.appendChild(submit);
    tools.appendChild(form);
    input.focus();
    var post = function (comment) {
      return M.send("POST", "/api/messages/" + id + "/feedback", { rating: rating, comment: comment }).then(function (r) {
        tools.querySelectorAll(".rate-up, .rate-down").forEach(function (b) { b.classList.remove("chosen"); });
        tools.querySelector(rating > 0 ? ".rate-up" : ".rate-down").classList.add("chosen");
        form.replaceWith(el("span", "thanks", r.ok ? t("thanks") : M.errorText(r.body)));
      });
    };
    // the rating counts at once; a comment, if written, replaces it with the comment attached
    M.send("POST", "/api/messages/" + id + "/feedback", { rating: rating });
    form.addEventListener("submit", function (ev) { ev.preventDefault(); post(input.value); });
  }

  // ---- streaming ---------------------------------------------------------------------------
  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    prompt.disabled = busy;
  }
  function showError(text) {
    var e = $("chat-error");
    e.textContent = text || "";
    e.hidden = !text;
  }
  function stream(url, body) {
    var controller = new AbortController();
    state.streaming = controller;
    setBusy(true);
    showError(null);
    var answer = appendMessage({ role: "assistant", content: "" });
    answer.classList.add("streaming");
    var text = "";
    var finish = function () {
      state.streaming = null;
      setBusy(false);
      $("queue-note").hidden = true;
      prompt.disabled = false;
      prompt.focus();
    };
    return fetch(url, {
      method: "POST", headers: { "Content-Type": "application/json" }, credentials: "same-origin",
      body: JSON.stringify(body), signal: controller.signal
    }).then(function (r) {
      if (!r.ok) {
        return r.json().catch(function () { return null; }).then(function (b) {
          answer.remove();
          showError(M.errorText(b));
          finish();
        });
      }
      var reader = r.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      var handle = function (name, data) {
        if (name === "queued") {
          $("queue-note").textContent = T[M.lang()].queued(data.position);
          $("queue-note").hidden = false;
        } else if (name === "token") {
          $("queue-note").hidden = true;
          text += data.text;
          answer.querySelector(".body").textContent = text;
          scrollDown();
        } else if (name === "done") {
          answer.remove();
          appendMessage({ id: data.message_id, role: "assistant", content: text, html: data.html, finish_reason: data.finish_reason }, true);
          scrollDown();
        } else if (name === "error") {
          answer.classList.remove("streaming");
          showError(data.message);
        }
      };
      var pump = function () {
        return reader.read().then(function (chunk) {
          if (chunk.done) return;
          buffer += decoder.decode(chunk.value, { stream: true });
          var parts = buffer.split("\n\n");
          buffer = parts.pop();
          parts.forEach(function (block) {
            var name = "message", data = "";
            block.split("\n").forEach(function (line) {
              if (line.indexOf("event:") === 0) name = line.slice(6).trim();
              else if (line.indexOf("data:") === 0) data += line.slice(5).replace(/^ /, "");
            });
            if (data) { try { handle(name, JSON.parse(data)); } catch (e) {} }
          });
          return pump();
        });
      };
      return pump().then(finish);
    }).catch(function (e) {
      if (e && e.name === "AbortError") {
        // stopped: the server keeps the partial answer; show it as stored
        answer.classList.remove("streaming");
        var stopped = function () { openConversation(state.current); };
        setTimeout(stopped, 300);
      } else {
        showError(t("network"));
      }
      finish();
    });
  }
  $("stop").addEventListener("click", function () { if (state.streaming) state.streaming.abort(); });
  function regenerate(id) {
    var node = messages.querySelector('.message[data-id="' + id + '"]');
    if (node) node.remove();
    stream("/api/messages/" + id + "/regenerate", {}).then(loadConversations);
  }
  $("composer").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var content = prompt.value.trim();
    if (!content || state.streaming) return;
    var go = function () {
      prompt.value = "";
      messages.querySelectorAll(".regenerate").forEach(function (b) { b.remove(); });
      appendMessage({ role: "user", content: content });
      scrollDown();
      return stream("/api/conversations/" + state.current + "/messages", { content: content }).then(loadConversations);
    };
    (state.current ? Promise.resolve() : newConversation()).then(go);
  });
  prompt.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });

  // ---- settings ----------------------------------------------------------------------------
  function loadSettings() {
    M.send("GET", "/api/me").then(function (r) {
      if (!r.ok) return;
      $("consent-text").textContent = r.body.consent_text[M.lang()];
      $("consent-version").textContent = r.body.consent.text_version;
      $("consent-switch").checked = r.body.consent.model_improvement;
    });
    loadKeys();
  }
  $("consent-switch").addEventListener("change", function (ev) {
    M.send("PUT", "/api/consent", { model_improvement: ev.target.checked }).then(function (r) {
      $("consent-result").textContent = r.ok ? t("consentSaved") : M.errorText(r.body);
      if (r.ok) ev.target.checked = r.body.model_improvement;
    });
  });
  function loadKeys() {
    M.send("GET", "/api/keys").then(function (r) {
      var ul = $("keys");
      ul.textContent = "";
      if (!r.ok) return;
      if (!r.body.keys.length) ul.appendChild(el("li", "hint", t("noKeys")));
      r.body.keys.forEach(function (k) {
        var li = el("li", "key");
        var used = k.last_used_at ? t("lastUsed") + " " + new Date(k.last_used_at).toLocaleString() : t("never");
        li.appendChild(el("code", "", k.prefix + "…"));
        li.appendChild(el("span", "", " " + (k.name || "") + " — " + (k.revoked_at ? t("revoked") : used) + " "));
        if (!k.revoked_at) {
          var b = el("button", "revoke", t("revoke"));
          b.addEventListener("click", function () { M.send("DELETE", "/api/keys/" + k.id).then(loadKeys); });
          li.appendChild(b);
        }
        ul.appendChild(li);
      });
    });
  }
  $("key-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var name = ev.target.elements.name.value;
    M.send("POST", "/api/keys", { name: name }).then(function (r) {
      var p = $("new-key");
      p.hidden = false;
      p.textContent = r.ok ? t("keyOnce") + r.body.key : M.errorText(r.body);
      ev.target.reset();
      loadKeys();
    });
  });

  document.addEventListener("moss:lang", function () { renderList(); if (!$("settings-view").hidden) loadSettings(); });
  prompt.placeholder = t("empty");
  loadConversations().then(function () {
    if (state.conversations.length) openConversation(state.conversations[0].id);
  });
})();
