// The blind review page. Everything from the run is inserted with
// textContent (never innerHTML), so prompts and answers render as text.
"use strict";
(() => {
  const KEYS = { a: "A", 1: "A", b: "B", 2: "B", t: "tie", 3: "tie", x: "both_bad", 4: "both_bad" };
  const $ = (id) => document.getElementById(id);
  let items = [];
  let pos = 0;
  let busy = false;

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
    if (done) return;
    const item = items[pos];
    $("prompt").textContent = item.prompt;
    $("reference-box").hidden = item.reference === null || item.reference === "";
    $("reference").textContent = item.reference || "";
    $("answer-a").textContent = item.a;
    $("answer-b").textContent = item.b;
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
        body: JSON.stringify({ item: item.id, choice, comment }),
      });
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || response.statusText);
      item.choice = choice;
      item.comment = comment.trim();
      setStatus(`Saved item ${pos + 1}.`, false);
      pos = nextOpen(pos);
      render();
    } catch (error) {
      setStatus(`Not saved: ${error.message}`, true);
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
      $("comment").maxLength = state.max_comment;
      render();
    })
    .catch((error) => {
      $("progress").textContent = `Could not load the review: ${error.message}`;
    });
})();
