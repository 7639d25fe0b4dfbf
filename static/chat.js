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
      queued: function (n, s) { return "You are number " + n + " in line" + (s ? " (about " + wait(s, "en") + ")" : "") + "…"; },
      cut: { length: "The answer was cut short (length limit).", cancelled: "The answer was stopped before it finished.",
             error: "The answer failed before it finished.", refused: "This request was declined." },
      network: "Network error, please try again.", empty: "Ask anything — in English or Chinese.",
      keyOnce: "Your new key (shown only once): ", revoke: "Revoke", noKeys: "No keys yet.",
      consentSaved: "Saved.", lastUsed: "last used", never: "never used", revoked: "revoked",
      ok: "OK", cancel: "Cancel", copyCode: "Copy code", welcome: "What can I help with?",
      model: function (m) { return "You are talking to " + m + "."; },
      examples: ["Explain recursion with a short example in Python", "把这句话翻译成英文：今天天气很好",
                 "Make a table of three planets with their distance from the sun", "Write a haiku about moss"],
      groups: ["Today", "Yesterday", "Previous 7 days", "Older"],
      search: "Search conversations", nothingFound: "Nothing found.", edit: "Edit", save: "Send",
      previous: "Previous version", next: "Next version",
      confirmAccountDelete: "Delete your account, your conversations and your keys for good?"
    },
    zh: {
      untitled: "新对话", rename: "重命名", del: "删除", confirmDelete: "删除这个对话？",
      newTitle: "新标题：", copy: "复制", copied: "已复制", regenerate: "重新生成", good: "回答得好",
      bad: "回答得不好", comment: "哪里好或不好？（可选）", send: "发送", thanks: "感谢你的反馈。",
      queued: function (n, s) { return "你排在第 " + n + " 位" + (s ? "（约 " + wait(s, "zh") + "）" : "") + "，请稍候…"; },
      cut: { length: "回答因长度限制被截断。", cancelled: "回答在完成前被停止。", error: "回答在完成前出错。", refused: "此请求已被拒绝。" },
      network: "网络错误，请重试。", empty: "用中文或英文问任何问题。",
      keyOnce: "新的密钥（只显示这一次）：", revoke: "撤销", noKeys: "还没有密钥。",
      consentSaved: "已保存。", lastUsed: "最近使用", never: "从未使用", revoked: "已撤销",
      ok: "确定", cancel: "取消", copyCode: "复制代码", welcome: "有什么可以帮你？",
      model: function (m) { return "当前模型：" + m + "。"; },
      examples: ["用一个简短的 Python 例子解释递归", "把这句话翻译成英文：今天天气很好",
                 "列一个表格：三颗行星和它们到太阳的距离", "写一首关于苔藓的短诗"],
      groups: ["今天", "昨天", "过去 7 天", "更早"],
      search: "搜索对话", nothingFound: "没有找到。", edit: "编辑", save: "发送",
      previous: "上一个版本", next: "下一个版本",
      confirmAccountDelete: "永久删除你的账号、对话和密钥？"
    }
  };
  function t(k) { return T[M.lang()][k]; }
  // A wait in words: seconds under two minutes, else minutes.
  function wait(s, lang) {
    if (s < 120) return s + (lang === "zh" ? " 秒" : " s");
    var m = Math.round(s / 60);
    return m + (lang === "zh" ? " 分钟" : " min");
  }
  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  var state = { conversations: [], current: null, streaming: null, follow: true, model: "" };

  // An in-page dialog (instead of the browser's prompt/confirm): resolves with the text typed
  // (or true, without `value`), or null when cancelled.
  function ask(question, value) {
    return new Promise(function (resolve) {
      var d = el("dialog", "ask");
      var form = el("form");
      form.method = "dialog";
      var label = el("label", "", question);
      var input = null;
      if (value !== undefined) {
        input = el("input");
        input.value = value;
        input.maxLength = 200;
        label.appendChild(input);
      }
      var row = el("div", "dialog-buttons");
      var cancel = el("button", "secondary-button", t("cancel"));
      cancel.type = "button";
      var ok = el("button", "primary", t("ok"));
      ok.type = "submit";
      row.appendChild(cancel); row.appendChild(ok);
      form.appendChild(label); form.appendChild(row);
      d.appendChild(form);
      document.body.appendChild(d);
      var answer = null;
      cancel.addEventListener("click", function () { d.close(); });
      form.addEventListener("submit", function () { answer = input ? input.value : true; });
      d.addEventListener("close", function () { d.remove(); resolve(answer); });
      d.showModal();
      (input || ok).focus();
    });
  }
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

  // ---- addresses: /c/{id} per conversation, / for a new one ----------------------------------
  function fromPath() {
    var m = location.pathname.match(/^\/c\/(\d+)$/);
    return m ? Number(m[1]) : null;
  }
  function address(id, replace) {
    var url = id ? "/c/" + id : "/";
    if (location.pathname !== url) history[replace ? "replaceState" : "pushState"]({ id: id }, "", url);
  }
  function find(id) {
    return state.conversations.filter(function (c) { return c.id === id; })[0];
  }
  function setTitle() {
    var c = find(state.current);
    document.title = (c && c.title ? c.title + " · " : "") + "moss";
  }
  window.addEventListener("popstate", function () {
    var id = fromPath();
    if (id) openConversation(id, true); else blank(true);
  });
  // A session that ended (another tab signed out, or it expired): this page becomes the sign-in
  // form, and signing in comes back here; the draft is kept (see `draft`).
  function signedOut(r) {
    if (r && r.status === 401) { location.reload(); return true; }
    return false;
  }

  // ---- conversations -----------------------------------------------------------------------
  // The list, or what the search box finds (titles and every message, Chinese words included).
  function loadConversations() {
    var q = $("search").value.trim();
    var url = "/api/conversations" + (q ? "?q=" + encodeURIComponent(q) : "");
    return M.send("GET", url).then(function (r) {
      if (signedOut(r) || !r.ok) return;
      if ($("search").value.trim() !== q) return; // a newer search is on its way
      state.conversations = r.body.conversations;
      renderList();
      setTitle();
    });
  }
  // Today, yesterday, the week before, older: by the conversation's last message.
  function groupOf(ms) {
    var day = new Date(); day.setHours(0, 0, 0, 0);
    var start = day.getTime(), oneDay = 86400000;
    if (ms >= start) return 0;
    if (ms >= start - oneDay) return 1;
    if (ms >= start - 7 * oneDay) return 2;
    return 3;
  }
  var searching = null;
  $("search").addEventListener("input", function () {
    clearTimeout(searching);
    searching = setTimeout(loadConversations, 200);
  });
  function renderList() {
    list.textContent = "";
    if (!state.conversations.length && $("search").value.trim()) {
      list.appendChild(el("li", "hint", t("nothingFound")));
    }
    var group = -1;
    state.conversations.forEach(function (c) {
      var g = groupOf(c.updated_at);
      if (g !== group) {
        group = g;
        list.appendChild(el("li", "group-label", t("groups")[g]));
      }
      var li = el("li", c.id === state.current ? "active" : "");
      li.setAttribute("data-id", c.id);
      var open = el("a", "conv-title", c.title || t("untitled"));
      open.href = "/c/" + c.id;
      if (c.id === state.current) open.setAttribute("aria-current", "page");
      open.addEventListener("click", function (ev) {
        if (ev.ctrlKey || ev.metaKey || ev.shiftKey) return; // a new tab or window
        ev.preventDefault();
        openConversation(c.id);
      });
      var rename = el("button", "conv-action", "✎");
      rename.title = t("rename");
      rename.addEventListener("click", function () {
        ask(t("newTitle"), c.title).then(function (title) {
          if (title === null || !title.trim()) return;
          M.send("PATCH", "/api/conversations/" + c.id, { title: title.trim() }).then(loadConversations);
        });
      });
      var del = el("button", "conv-action", "×");
      del.title = t("del");
      del.addEventListener("click", function () {
        ask(t("confirmDelete")).then(function (yes) {
          if (!yes) return;
          M.send("DELETE", "/api/conversations/" + c.id).then(function () {
            if (state.current === c.id) blank();
            loadConversations();
          });
        });
      });
      li.appendChild(open); li.appendChild(rename); li.appendChild(del);
      list.appendChild(li);
    });
  }
  // Leaves the answer being shown to run on (the server finishes and stores it).
  function detach() {
    if (state.streaming) state.streaming.controller.abort();
    state.streaming = null;
    setBusy(false);
    $("queue-note").hidden = true;
  }
  function openConversation(id, fromHistory) {
    detach();
    state.current = id;
    if (!fromHistory) address(id);
    show("chat");
    renderList();
    setTitle();
    restoreDraft();
    return M.send("GET", "/api/conversations/" + id).then(function (r) {
      if (signedOut(r)) return;
      if (state.current !== id) return; // another was opened meanwhile
      if (!r.ok) { messages.textContent = ""; blank(); address(null, true); return; }
      render(r.body);
      state.follow = true;
      scrollDown();
      if (r.body.answering) follow(id);
    });
  }
  // The branch being viewed.
  function render(conversation) {
    messages.textContent = "";
    var msgs = conversation.messages;
    msgs.forEach(function (m, i) { appendMessage(m, i === msgs.length - 1 && !conversation.answering); });
  }
  // Shown again as stored (after an edit or a regenerate: the versions changed), where the reader is.
  function refresh(conv) {
    if (state.current !== conv || state.streaming) return;
    var top = messages.scrollTop;
    M.send("GET", "/api/conversations/" + conv).then(function (r) {
      if (!r.ok || state.current !== conv || state.streaming) return;
      render(r.body);
      messages.scrollTop = state.follow ? messages.scrollHeight : top;
    });
  }
  // ‹ i / n ›: another version of a question or an answer, and the branch that follows it.
  function branchNav(m) {
    var at = m.siblings.indexOf(m.id);
    var nav = el("span", "branch-nav");
    var go = function (to) {
      return function () {
        M.send("POST", "/api/conversations/" + state.current + "/branch", { message_id: m.siblings[to] }).then(function (r) {
          if (r.ok) render(r.body);
        });
      };
    };
    var prev = el("button", "branch-prev", "‹");
    prev.type = "button"; prev.title = t("previous"); prev.setAttribute("aria-label", t("previous"));
    prev.disabled = at <= 0;
    prev.addEventListener("click", go(at - 1));
    var next = el("button", "branch-next", "›");
    next.type = "button"; next.title = t("next"); next.setAttribute("aria-label", t("next"));
    next.disabled = at >= m.siblings.length - 1;
    next.addEventListener("click", go(at + 1));
    nav.appendChild(prev);
    nav.appendChild(el("span", "branch-at", (at + 1) + " / " + m.siblings.length));
    nav.appendChild(next);
    return nav;
  }
  // A question edited in place: sent as a new version beside the old one.
  function editQuestion(div, m) {
    if (state.streaming) return;
    var form = el("form", "edit-form");
    var area = el("textarea");
    area.value = m.content;
    area.rows = Math.min(10, m.content.split("\n").length + 1);
    area.setAttribute("aria-label", t("edit"));
    var cancel = el("button", "secondary-button", t("cancel"));
    cancel.type = "button";
    var save = el("button", "primary", t("save"));
    save.type = "submit";
    var row = el("div", "dialog-buttons");
    row.appendChild(cancel); row.appendChild(save);
    form.appendChild(area); form.appendChild(row);
    div.hidden = true;
    div.parentNode.insertBefore(form, div.nextSibling);
    area.focus();
    cancel.addEventListener("click", function () { form.remove(); div.hidden = false; });
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var content = area.value.trim();
      if (!content) return;
      var conv = state.current;
      // What came after the edited question belongs to the other version now.
      while (form.nextSibling) form.nextSibling.remove();
      form.remove();
      div.remove();
      appendMessage({ role: "user", content: content, sent: true });
      state.follow = true;
      scrollDown();
      stream(conv, "POST", "/api/messages/" + m.id + "/edit", { content: content }, function (why) {
        showError(why);
        openConversation(conv, true);
      }).then(function () { refresh(conv); });
    });
  }
  // A new conversation exists only once something is sent in it.
  function blank(fromHistory) {
    detach();
    state.current = null;
    if (!fromHistory) address(null);
    messages.textContent = "";
    welcome();
    renderList();
    setTitle();
    restoreDraft();
  }
  // A new conversation: which model answers, and a few things to try.
  function welcome() {
    var w = el("div", "welcome");
    w.appendChild(el("h2", "", t("welcome")));
    if (state.model) w.appendChild(el("p", "hint", T[M.lang()].model(state.model)));
    var ideas = el("div", "examples");
    t("examples").forEach(function (text) {
      var b = el("button", "example", text);
      b.type = "button";
      b.addEventListener("click", function () { prompt.value = text; $("composer").requestSubmit(); });
      ideas.appendChild(b);
    });
    w.appendChild(ideas);
    messages.appendChild(w);
  }
  $("new-chat").addEventListener("click", function () { blank(); show("chat"); prompt.focus(); });

  // ---- drafts: what is typed survives a refused send, a reload and a sign-in ----------------
  function draftKey() { return "moss.draft." + (state.current || "new"); }
  function saveDraft() { try { sessionStorage.setItem(draftKey(), prompt.value); } catch (e) {} }
  function restoreDraft() {
    var d = null;
    try { d = sessionStorage.getItem(draftKey()); } catch (e) {}
    prompt.value = d || "";
  }
  prompt.addEventListener("input", saveDraft);

  // ---- messages ----------------------------------------------------------------------------
  function atBottom() { return messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40; }
  function scrollDown() { messages.scrollTop = messages.scrollHeight; $("jump").hidden = true; }
  // Follows the answer only while the reader is at the bottom.
  function keepUp() { if (state.follow) scrollDown(); else $("jump").hidden = false; }
  messages.addEventListener("scroll", function () {
    state.follow = atBottom();
    if (state.follow) $("jump").hidden = true;
  });
  $("jump").addEventListener("click", function () { state.follow = true; scrollDown(); });
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
    // A question just sent has its tools too (inactive until it is stored), so that nothing
    // moves when it is shown as stored.
    if (m.role === "user" && (m.id || m.sent)) {
      var own = el("div", "tools user-tools");
      if (m.siblings && m.siblings.length > 1) own.appendChild(branchNav(m));
      var change = el("button", "edit", t("edit"));
      change.type = "button";
      change.disabled = !m.id;
      change.addEventListener("click", function () { editQuestion(div, m); });
      own.appendChild(change);
      div.appendChild(own);
    }
    if (m.role === "assistant") {
      decorateCode(body);
      var note = cutNote(m.finish_reason);
      if (note) div.appendChild(note);
      if (m.id) div.appendChild(answerTools(m, isLast));
    }
    messages.appendChild(div);
    return div;
  }
  // Each code block gets its language and a copy button for its code alone.
  function decorateCode(body) {
    body.querySelectorAll("pre").forEach(function (pre) {
      var code = pre.querySelector("code");
      var lang = code && /language-([\w+-]+)/.exec(code.className);
      var bar = el("div", "code-bar");
      bar.appendChild(el("span", "code-lang", lang ? lang[1] : ""));
      var copy = el("button", "copy-code", t("copyCode"));
      copy.type = "button";
      copy.addEventListener("click", function () {
        var done = function () { copy.textContent = t("copied"); };
        if (navigator.clipboard) navigator.clipboard.writeText((code || pre).textContent).then(done, done); else done();
      });
      bar.appendChild(copy);
      pre.parentNode.insertBefore(bar, pre);
    });
  }
  function answerTools(m, isLast) {
    var tools = el("div", "tools");
    if (m.siblings && m.siblings.length > 1) tools.appendChild(branchNav(m));
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
      if (m.rating === spec[0]) b.classList.add("chosen"); // rated before, shown after a reload
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
  }
  function showError(text) {
    var e = $("chat-error");
    e.textContent = text || "";
    e.hidden = !text;
  }
  // An answer as it comes: the server's latest rendering (sanitised HTML), then the pieces that
  // came after it as plain text, until the next rendering.
  function Bubble() {
    this.node = appendMessage({ role: "assistant", content: "" });
    this.node.classList.add("streaming");
    this.text = "";
    this.rendered = null;
    this.upto = 0;
  }
  // A new rendering replaces the body; a new piece only changes the text after it.
  Bubble.prototype.draw = function (rendering) {
    var body = this.node.querySelector(".body");
    if (this.rendered === null) { body.textContent = this.text; return; }
    if (rendering || !this.tail) {
      body.innerHTML = this.rendered; // sanitised by the server
      // After the last paragraph's or code block's text; after a table or list, below it.
      var last = body.lastElementChild;
      if (!last || /^(TABLE|UL|OL|HR|BLOCKQUOTE)$/.test(last.tagName)) last = body;
      else if (last.tagName === "PRE") last = last.querySelector("code") || last;
      this.tail = last.appendChild(el("span", "tail"));
    }
    this.tail.textContent = this.text.slice(this.upto);
  };
  // Reads a response's server-sent events; resolves when the stream ends.
  function consume(r, conv) {
    var bubble = new Bubble();
    var reader = r.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    var handle = function (name, data) {
      if (state.current !== conv) return;
      if (name === "queued") {
        $("queue-note").textContent = T[M.lang()].queued(data.position, data.wait_secs);
        $("queue-note").hidden = false;
      } else if (name === "token") {
        $("queue-note").hidden = true;
        bubble.text += data.text;
        bubble.draw();
        keepUp();
      } else if (name === "html") {
        bubble.rendered = data.html;
        bubble.upto = data.text_len;
        bubble.draw(true);
        keepUp();
      } else if (name === "done") {
        bubble.node.remove();
        if (data.message_id) {
          appendMessage({ id: data.message_id, role: "assistant", content: bubble.text, html: data.html, finish_reason: data.finish_reason }, true);
        }
        keepUp();
      } else if (name === "error") {
        bubble.node.classList.remove("streaming");
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
    return pump().then(function () { bubble.node.classList.remove("streaming"); });
  }
  // Starts an answer (send, regenerate) or follows the one being made (`method` GET); `refused`
  // is called when the server turns the request down before anything is streamed. Resolves
  // with true once an answer was streamed.
  function stream(conv, method, url, body, refused) {
    var controller = new AbortController();
    var mine = { controller: controller, conv: conv };
    state.streaming = mine;
    setBusy(true);
    showError(null);
    var finish = function () {
      if (state.streaming !== mine) return;
      state.streaming = null;
      setBusy(false);
      $("queue-note").hidden = true;
      prompt.focus();
    };
    return fetch(url, {
      method: method, headers: { "Content-Type": "application/json" }, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body), signal: controller.signal
    }).then(function (r) {
      if (r.status === 204) { finish(); return false; }
      if (!r.ok) {
        return r.json().catch(function () { return null; }).then(function (b) {
          if (signedOut(r)) return false;
          finish();
          if (refused) refused(M.errorText(b)); else showError(M.errorText(b));
          return false;
        });
      }
      return consume(r, conv).then(function () {
        finish();
        if (state.current === conv) loadConversations();
        return true;
      });
    }).catch(function (e) {
      if (!(e && e.name === "AbortError")) showError(t("network"));
      finish();
      return false;
    });
  }
  function follow(conv) {
    return stream(conv, "GET", "/api/conversations/" + conv + "/stream");
  }
  function stop() {
    if (!state.streaming) return;
    M.send("POST", "/api/conversations/" + state.streaming.conv + "/stop");
  }
  $("stop").addEventListener("click", stop);
  document.addEventListener("keydown", function (ev) { if (ev.key === "Escape") stop(); });
  function regenerate(id) {
    var node = messages.querySelector('.message[data-id="' + id + '"]');
    if (node) node.remove();
    var conv = state.current;
    stream(conv, "POST", "/api/messages/" + id + "/regenerate", {}, function (why) {
      showError(why);
      openConversation(conv, true);
    }).then(function () { refresh(conv); });
  }
  $("composer").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var content = prompt.value.trim();
    if (!content || state.streaming) return;
    var created = false;
    var go = function (conv) {
      prompt.value = "";
      messages.querySelectorAll(".regenerate, .welcome").forEach(function (b) { b.remove(); });
      var question = appendMessage({ role: "user", content: content, sent: true });
      state.follow = true;
      scrollDown();
      return stream(conv, "POST", "/api/conversations/" + conv + "/messages", { content: content }, function (why) {
        // Turned down (too long, busy, cooling down, overloaded): nothing was stored, so the
        // question goes back into the composer with the reason next to it.
        question.remove();
        prompt.value = content;
        saveDraft();
        showError(why);
        if (created) {
          // The conversation made for it goes again; the text stays, as a new chat's draft.
          M.send("DELETE", "/api/conversations/" + conv).then(function () {
            state.current = null;
            address(null, true);
            saveDraft();
            if (!messages.querySelector(".message")) welcome();
            loadConversations();
          });
        }
      }).then(function (answered) {
        if (!answered) return;
        try { sessionStorage.removeItem("moss.draft." + conv); } catch (e) {}
        refresh(conv); // the question's own tools (edit) come with its stored form
      });
    };
    if (state.current) { saveDraft(); go(state.current); return; }
    M.send("POST", "/api/conversations", {}).then(function (r) {
      if (signedOut(r)) return;
      if (!r.ok) { showError(M.errorText(r.body)); return; }
      created = true;
      state.current = r.body.id;
      address(r.body.id);
      saveDraft();
      try { sessionStorage.removeItem("moss.draft.new"); } catch (e) {}
      go(r.body.id).then(loadConversations);
      loadConversations();
    });
  });
  prompt.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  // The composer grows with what is typed (up to a third of the window).
  prompt.addEventListener("input", function () {
    prompt.style.height = "auto";
    prompt.style.height = Math.min(prompt.scrollHeight + 2, window.innerHeight / 3) + "px";
  });

  // ---- settings ----------------------------------------------------------------------------
  function loadSettings() {
    M.send("GET", "/api/me").then(function (r) {
      if (!r.ok) return;
      $("consent-text").textContent = r.body.consent_text[M.lang()];
      $("consent-version").textContent = r.body.consent.text_version;
      $("consent-switch").checked = r.body.consent.model_improvement;
      $("name-form").elements.display_name.value = r.body.user.display_name;
    });
    loadKeys();
  }
  // ---- the account -------------------------------------------------------------------------
  function said(form, r, done) { M.say(form, r.ok ? done : M.errorText(r.body), !r.ok); }
  $("name-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var form = ev.target;
    M.send("PUT", "/api/me/profile", { display_name: form.elements.display_name.value }).then(function (r) {
      said(form, r, t("consentSaved"));
    });
  });
  $("password-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var form = ev.target;
    M.send("PUT", "/api/me/password", { current: form.elements.current.value, password: form.elements.password.value }).then(function (r) {
      said(form, r, t("consentSaved"));
      if (r.ok) form.reset();
    });
  });
  $("delete-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var form = ev.target;
    ask(t("confirmAccountDelete")).then(function (yes) {
      if (!yes) return;
      M.send("POST", "/api/me/delete", { password: form.elements.password.value }).then(function (r) {
        if (r.ok) { location.href = "/"; return; }
        said(form, r, "");
      });
    });
  });
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

  // Everything the script wrote follows the language at once.
  document.addEventListener("moss:lang", function () {
    prompt.placeholder = t("empty");
    $("search").placeholder = t("search");
    renderList();
    if (!$("settings-view").hidden) loadSettings();
    if (state.current && !state.streaming) openConversation(state.current, true);
    if (!state.current) { messages.textContent = ""; welcome(); }
  });
  prompt.placeholder = t("empty");
  $("search").placeholder = t("search");
  var first = fromPath();
  if (first) openConversation(first, true); else blank(true);
  M.send("GET", "/api/me").then(function (r) {
    if (!r.ok) return;
    state.model = r.body.model;
    if (!state.current) { messages.textContent = ""; welcome(); }
  });
  loadConversations();
  prompt.focus();
})();
