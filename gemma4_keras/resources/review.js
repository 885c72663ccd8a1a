// The blind review page. Everything from the run is inserted with
// textContent (never innerHTML), so prompts and answers render as text.
"use strict";
(() => {
  const KEYS = { a: "A", 1: "A", b: "B", 2: "B", t: "tie", 3: "tie", x: "both_bad", 4: "both_bad" };
  const $ = (id) => document.getElementById(id);
  let items = [];
  let pos = 0;
  let busy = false;
  let workdir = "RUN";

  // A shell word for the workdir (quoted when it holds spaces or quotes).
  const shellWord = (text) =>
    /^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replace(/'/g, "'\\''")}'`;
  const command = (flags) => `gemma4-keras review --workdir=${shellWord(workdir)}${flags}`;

  // What a failed fetch means to the reviewer: the server is gone.
  const UNREACHABLE =
    "the review server is not answering (it was stopped, or the connection dropped)";

  // Answers made only of whitespace would be an empty box: say what is there.
  function showText(element, text) {
    const blank = text.trim() === "";
    element.classList.toggle("blank", blank);
    if (!blank) {
      element.textContent = text;
      return;
    }
    const counts = { " ": 0, "\n": 0, "\t": 0 };
    let other = 0;
    for (const ch of text) {
      if (ch in counts) counts[ch] += 1;
      else other += 1;
    }
    const parts = [];
    if (counts[" "]) parts.push(`${counts[" "]} space${counts[" "] > 1 ? "s" : ""}`);
    if (counts["\n"]) parts.push(`${counts["\n"]} newline${counts["\n"] > 1 ? "s" : ""}`);
    if (counts["\t"]) parts.push(`${counts["\t"]} tab${counts["\t"] > 1 ? "s" : ""}`);
    if (other) parts.push(`${other} other blank character${other > 1 ? "s" : ""}`);
    element.textContent = text === "" ? "(empty answer)" : `(only whitespace: ${parts.join(", ")})`;
  }

  const judged = () => items.filter((item) => item.choice).length;

  function nextOpen(from) {
    for (let k = 1; k <= items.length; k++) {
      const j = (from + k) % items.length;
      if (!items[j].choice) return j;
    }
    return items.length;
  }

  function setStatus(text, error) {
    $("status").textContent = text;
    $("status").className = error ? "error" : "";
  }

  function render() {
    const total = items.length;
    const done = pos >= total;
    $("bar").max = total || 1;
    $("bar").value = judged();
    $("progress").textContent = done
      ? `All ${total} judged`
      : `Item ${pos + 1} of ${total} \u00b7 ${judged()} judged`;
    $("review").hidden = done;
    $("done").hidden = !done;
    $("summary-command").textContent = command(" --summary");
    if (done) return;
    const item = items[pos];
    $("prompt").textContent = item.prompt;
    $("reference-box").hidden = item.reference === null || item.reference === "";
    $("reference").textContent = item.reference || "";
    showText($("answer-a"), item.a);
    showText($("answer-b"), item.b);
    $("comment").value = item.comment || "";
    for (const button of document.querySelectorAll("[data-choice]")) {
      button.setAttribute("aria-pressed", String(button.dataset.choice === item.choice));
    }
    $("prev").disabled = pos === 0;
  }

  async function judge(choice) {
    if (busy || pos >= items.length) return;
    busy = true;
    const item = items[pos];
    const comment = $("comment").value;
    try {
      const response = await fetch("api/judgement", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ item: item.id, choice, comment, seen: item.revision }),
      });
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || response.statusText);
      item.choice = choice;
      item.comment = comment.trim();
      item.revision = body.revision;
      setStatus(`Saved item ${pos + 1}.`, false);
      pos = nextOpen(pos);
      render();
    } catch (error) {
      // fetch rejects with a TypeError ("Failed to fetch") when nothing answers.
      const why = error instanceof TypeError ? `${UNREACHABLE}; restart it with ${command("")} and reload this page` : error.message;
      setStatus(`Not saved: ${why}`, true);
    } finally {
      busy = false;
    }
  }

  function move(step) {
    pos = Math.min(items.length, Math.max(0, pos + step));
    setStatus("", false);
    render();
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.tagName === "TEXTAREA") {
      if (event.key === "Escape") event.target.blur();
      return;
    }
    if (event.key === "ArrowLeft") move(-1);
    else if (event.key === "ArrowRight") move(1);
    else if (event.key.toLowerCase() === "c" && pos < items.length) {
      event.preventDefault();
      $("comment").focus();
    } else if (KEYS[event.key.toLowerCase()]) {
      event.preventDefault();
      judge(KEYS[event.key.toLowerCase()]);
    }
  });
  for (const button of document.querySelectorAll("[data-choice]")) {
    button.addEventListener("click", () => {
      button.blur();
      judge(button.dataset.choice);
    });
  }
  $("prev").addEventListener("click", () => move(-1));
  $("next").addEventListener("click", () => move(1));

  fetch("api/state")
    .then((response) => response.json())
    .then((state) => {
      items = state.items;
      pos = state.resume;
      workdir = state.workdir;
      $("comment").maxLength = state.max_comment;
      render();
    })
    .catch((error) => {
      const why = error instanceof TypeError ? `${UNREACHABLE}; start it with gemma4-keras review --workdir=RUN and reload this page` : error.message;
      $("progress").textContent = `Could not load the review: ${why}`;
    });
})();
