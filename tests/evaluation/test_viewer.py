"""The trajectory viewer (evaluation/viewer.py): the page's embedded data, and the page in a real Chromium.

Episodes are real: Python-v0 played through the agent loop by the scripted expert, the wrong policy and a
script that breaks its tools; plus one trajectory built with the Trajectory append API from rendered M2
text (a failed episode with a -inf log-prob and HTML in its text). The browser test saves screenshots
to $M2RL_VIEWER_SCREENSHOTS (default: the test's tmp_path) for a person to look at.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from m2rl.agent.render import render_completion, render_ids, render_tool_suffix
from m2rl.agent.trajectory import Trajectory
from m2rl.evaluation.viewer import page_episode, render_report_html, write_report_html
from m2rl.model import M2Tokenizer
from m2rl.rewards.episode import Episode

TOK = M2Tokenizer.tiny()
INJECTION = "</script><!-- <img src=x onerror=\"document.title='pwned'\"> </SCRIPT>"
PYTHON_TOOL = {"type": "function", "function": {
    "name": "python", "description": "Run Python code.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}
SUBMIT_TOOL = {"type": "function", "function": {
    "name": "submit", "description": "Submit the final answer.",
    "parameters": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}}}


def as_viewer_episode(trajectory: Trajectory, id: str, sample: int, family: str | None,
                      error: str | None = None) -> dict[str, Any]:
    """What an eval hands the viewer for one episode (evaluation/viewer.py's ViewerEpisode)."""
    episode = Episode.from_infos(trajectory.metadata.get("steps", []))
    verdict = episode.verification
    return {"id": id, "task_id": trajectory.metadata.get("task_id") or "?", "sample": sample,
            "resolved": episode.resolved, "score": verdict.score if verdict else 0.0, "family": family,
            "error": error, "exit_reason": trajectory.metadata.get("exit_reason", ""),
            "reward_breakdown": episode.reward_breakdown(), "turns": trajectory.num_turns,
            "tokens": len(trajectory.ids), "wall_s": trajectory.metadata.get("elapsed_s"),
            "trajectory": trajectory.to_dict()}


def built_failed_episode() -> dict[str, Any]:
    """A two-turn episode from rendered M2 text that failed in its second turn: a traceback from the tool,
    an env error, HTML and `</script>` in the model's text, a forced token with log-prob -inf."""
    tools = [PYTHON_TOOL, SUBMIT_TOOL]
    prompt = [{"role": "system", "content": "You are a careful assistant that solves problems by running code."},
              {"role": "user", "content": "Compute `7 * 6` with the python tool and submit the result."}]
    first = {"role": "assistant", "content": "", "reasoning_content": f"Maybe {INJECTION} works.",
             "tool_calls": [{"name": "python", "arguments": {"code": "print(7 * 6 / 0)"}}]}
    traceback = "Traceback (most recent call last):\nZeroDivisionError: division by zero\n"
    second = {"role": "assistant", "content": f"I give up {INJECTION}", "reasoning_content": "Out of ideas."}
    t = Trajectory(tools=tools)
    t.messages = [*prompt]
    t.append_prompt(render_ids(TOK, prompt, tools, add_generation_prompt=True))
    ids = TOK.encode(render_completion(first))
    t.append_sampled(ids, [-0.25] * (len(ids) - 1) + [float("-inf")], version=3)
    t.messages += [first, {"role": "tool", "content": traceback}]
    t.append_env(TOK.encode(render_tool_suffix([traceback])))
    ids = TOK.encode(render_completion(second))
    t.append_sampled(ids, [-1.5] * len(ids), version=4)
    t.messages.append(second)
    t.rewards = [0.05, -0.05]
    breakdown = {"valid_tool_call": 0.05, "format_error": 0.0, "resolved": 0.0}
    t.metadata = {
        "task_id": "python/arith/7", "exit_reason": "error", "exit_message": "RuntimeError: sandbox died",
        "elapsed_s": 1.25,
        "steps": [
            {"tool_calls": [{"name": "python", "arguments": {"code": "print(7 * 6 / 0)"}}],
             "tool_results": [{"name": "python", "ok": False, "output": traceback}],
             "reward_breakdown": breakdown, "responses": [traceback]},
            {"errors": [{"kind": "format", "message": "no tool call in the turn"}],
             "reward_breakdown": {**breakdown, "valid_tool_call": 0.0, "format_error": -0.05}},
        ],
    }
    assert t.validate() == []
    return as_viewer_episode(t, "built-failed", 0, None, error="RuntimeError: sandbox died")


def embedded_data(page: str) -> tuple[str, Any]:
    raw = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.DOTALL).group(1)
    return raw, json.loads(raw)


# ----------------------------------------------------------------------------- the page's data, pure


def test_embedded_json_cannot_close_its_script_tag_and_keeps_the_text_exact() -> None:
    episode = built_failed_episode()
    page = render_report_html(f"report {INJECTION}", {"note": INJECTION}, [episode])
    raw, data = embedded_data(page)
    assert "<" not in raw and ">" not in raw  # so neither </script> nor <!-- can appear in the data
    assert page.lower().count("</script") == 2 and "<!--" not in page  # the data tag's and the script's
    assert "<title>report &lt;/script&gt;" in page
    assert data["title"] == f"report {INJECTION}" and data["summary"] == {"note": INJECTION}
    shown = data["episodes"][0]
    assert shown["trajectory"]["messages"] == episode["trajectory"]["messages"]  # model text unchanged
    forced = episode["trajectory"]["spans"][1]["end"] - 1  # the first turn's last token
    assert shown["trajectory"]["logprobs"][forced] is None  # -inf: JSON.parse rejects Infinity


def test_the_page_embeds_a_compact_trajectory_that_expands_to_the_original() -> None:
    episode = built_failed_episode()
    shown = page_episode(episode)
    original, compact = episode["trajectory"], shown["trajectory"]
    assert shown["tool_errors"] == 2 and shown["return"] == pytest.approx(0.0)
    assert [v for v, n in compact["loss_mask"] for _ in range(n)] == original["loss_mask"]
    assert [v for v, n in compact["policy_versions"] for _ in range(n)] == original["policy_versions"]
    assert len(compact["policy_versions"]) == 4  # prompt, v3, env, v4: one run per span
    assert compact["ids"] == original["ids"] and compact["spans"] == original["spans"]
    assert compact["metadata"]["steps"][0]["tool_results"] == [{"name": "python", "ok": False}]
    assert "responses" not in compact["metadata"]["steps"][0]


def test_a_page_with_no_episodes_renders() -> None:
    page = render_report_html("nothing yet", {"episodes": 0}, [])
    _, data = embedded_data(page)
    assert data == {"title": "nothing yet", "summary": {"episodes": 0}, "episodes": []}
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"src=|href=|url\(|https?:|@import", page)  # the page refers to nothing outside it


def test_an_episode_with_a_tool_error_and_no_trajectory_renders() -> None:
    failed = built_failed_episode()
    lost = {**failed, "id": "lost", "trajectory": {}}
    _, data = embedded_data(render_report_html("t", {}, [failed, lost]))
    assert [e["tool_errors"] for e in data["episodes"]] == [2, 0]
    assert data["episodes"][1]["trajectory"] == {}
    with pytest.raises(ValueError, match=r"lacks \['turns'\]"):
        render_report_html("t", {}, [{k: v for k, v in failed.items() if k != "turns"}])


def test_trajectories_past_the_page_cap_keep_their_rows_and_say_where_they_are() -> None:
    episodes = [{**built_failed_episode(), "id": f"e{i}"} for i in range(5)]
    one = len(json.dumps(page_episode(episodes[0])["trajectory"], ensure_ascii=False, separators=(",", ":")))
    _, data = embedded_data(render_report_html("t", {}, episodes, max_trajectory_bytes=2 * one + 10))
    shown = data["episodes"]
    assert [e["id"] for e in shown] == ["e0", "e1", "e2", "e3", "e4"]  # every row stays
    assert [bool(e["trajectory"]) for e in shown] == [True, True, False, False, False]
    assert [e.get("trajectory_omitted") for e in shown] == [None, None, one, one, one]
    assert all(e["tool_errors"] == 2 for e in shown)  # counted before the cap
    _, whole = embedded_data(render_report_html("t", {}, episodes))  # the default cap holds a normal eval
    assert all(e["trajectory"] and "trajectory_omitted" not in e for e in whole["episodes"])


def test_training_samples_become_a_report_with_one_family_per_step(tmp_path: Path) -> None:
    from m2rl.rl.trajectory_samples import trajectory_sample, write_sample_report
    from m2rl.runs import read_jsonl

    class Sampled:  # an rl.rollout episode record, as the trainer hands it to trajectory_sample
        def __init__(self, trajectory: Trajectory, group: int) -> None:
            self.task_id, self.group, self.trajectory = trajectory.metadata["task_id"], group, trajectory
            self.exit_reason, self.error = "error", "RuntimeError: sandbox died"
            self.reward, self.resolved, self.sampled_tokens = sum(trajectory.rewards), False, 10
            self.reward_breakdown, self.detectors = {"resolved": 0.0}, {}

    trajectory = Trajectory.from_dict(built_failed_episode()["trajectory"])
    folder = tmp_path / "trajectories"
    folder.mkdir()
    assert write_sample_report(folder) is None  # no sample yet
    for step in (1, 2, 10):
        records = trajectory_sample([Sampled(trajectory, g) for g in range(3)], TOK, step, 2, max_chars=300)
        (folder / f"step_{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    saved = read_jsonl(folder / "step_000001.jsonl")[0]["trajectory"]
    assert Trajectory.from_dict(saved).ids == trajectory.ids  # every id kept; text cut
    assert all(len(m["content"]) <= 300 and len(m.get("reasoning_content") or "") <= 300 for m in saved["messages"])
    _, data = embedded_data(write_sample_report(folder).read_text())
    assert [e["family"] for e in data["episodes"]] == ["step 1"] * 2 + ["step 2"] * 2 + ["step 10"] * 2
    assert data["summary"]["steps"] == "1\u201310" and data["summary"]["episodes"] == 6
    assert data["episodes"][0]["trajectory"]["ids"] == trajectory.ids
    one_file = (folder / "step_000010.jsonl").stat().st_size
    _, newest = embedded_data(write_sample_report(folder, max_bytes=one_file).read_text())
    assert {e["family"] for e in newest["episodes"]} == {"step 10"}
    assert newest["summary"]["older steps left out"] == 2


# ----------------------------------------------------------------------------- the page in Chromium


def played_episodes() -> list[dict[str, Any]]:
    """Python-v0 through the agent loop: the expert on three tasks, the wrong policy on one, and a script
    whose code raises, that calls an unknown tool, then submits HTML."""
    import gymnasium
    import m2rl.envs  # noqa: F401  (registers the env ids)
    from m2rl.agent.loop import LoopConfig, arun_episode
    from m2rl.agent.policy import SamplingParams
    from m2rl.envs.experts import python_expert, python_wrong
    from m2rl.rl.sft import ExpertPolicy, RecordInfo

    def breaks_its_tools(task: Any) -> Any:
        yield [("python", {"code": "print(1 / 0)"})]
        yield [("no_such_tool", {"x": 1})]
        yield [("submit", {"answer": INJECTION})]

    plays = [("python/arith/9", python_expert), ("python/collatz/15", python_expert),
             ("python/sha256/11", python_expert), ("python/arith/9", python_wrong),
             ("python/collatz/15", breaks_its_tools)]
    env = RecordInfo(gymnasium.make("m2rl/Python-v0", split="test", max_steps=4))
    params = SamplingParams(max_tokens=2048, stop_ids=(TOK.eos_id,))
    episodes = []
    try:
        for n, (task_id, script) in enumerate(plays):
            trajectory = asyncio.run(arun_episode(ExpertPolicy(env, script, TOK), env, TOK, params,
                                                  LoopConfig(max_turns=4, max_context_tokens=4096),
                                                  options={"task_id": task_id}))
            sample = sum(1 for t, _ in plays[:n] if t == task_id)
            episodes.append(as_viewer_episode(trajectory, f"{task_id}#{sample}", sample, task_id.split("/")[1]))
    finally:
        env.close()
    return episodes


async def check_report(browser: Any, report: Path, empty: Path, shots: Path) -> dict[str, Any]:
    """Drive the page as a reader would; returns what was seen for the test to assert on."""
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    requests: list[str] = []
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
            if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("request", lambda request: requests.append(request.url))
    seen: dict[str, Any] = {}

    async def count() -> str:
        return await page.text_content("#count")

    async def filtered(select: str, value: str) -> str:
        await page.select_option(select, value)
        shown = await count()
        await page.select_option(select, "")
        return shown

    await page.goto(empty.as_uri())
    seen["empty"] = await count()
    await page.goto(report.as_uri())
    seen["title"] = await page.title()
    seen["all"] = await count()
    seen["resolved"] = await filtered("#f-outcome", "resolved")
    seen["unresolved"] = await filtered("#f-outcome", "unresolved")
    seen["family collatz"] = await filtered("#f-family", "collatz")
    seen["family none"] = await filtered("#f-family", "(none)")
    seen["any error"] = await filtered("#f-errors", "any")
    seen["episode failed"] = await filtered("#f-errors", "episode")
    seen["tool errors"] = await filtered("#f-errors", "tool")
    await page.fill("#f-task", "sha256")
    seen["search"] = await count()
    await page.fill("#f-task", "")
    await page.screenshot(path=str(shots / "list.png"))

    await page.click("tr:has-text('collatz') >> nth=1")  # the episode whose tools broke
    seen["turns"] = await page.locator("#detail section.turn").count()
    seen["detail"] = await page.inner_text("#detail")
    seen["tool calls"] = await page.locator("#detail .msg.tool-call code").all_text_contents()
    seen["failed results"] = await page.locator("#detail .msg.tool-result.failed").count()
    seen["injected img"] = await page.locator("#detail img").count()
    seen["chips before"] = await page.locator(".tok").count()
    await page.click("#detail section.turn[data-turn='0'] details.tokens > summary")
    await page.wait_for_selector(".tok")  # built on the details' toggle event
    seen["chips sampled"] = await page.locator(".tok.sampled").count()
    seen["chips env"] = await page.locator(".tok.env").count()
    seen["chips trained"] = await page.locator(".tok.trained").count()
    seen["chip title"] = await page.locator(".tok.sampled").first.get_attribute("title")
    await page.screenshot(path=str(shots / "trajectory.png"), full_page=True)

    await page.goto(report.as_uri() + "#" + "python%2Farith%2F9%231")  # a link to the wrong policy's episode
    seen["linked"] = await page.inner_text("#detail h2")
    seen["document title"] = await page.evaluate("document.title")
    seen["problems"], seen["requests"] = problems, requests
    await page.close()
    return seen


@pytest.mark.bwrap
@pytest.mark.browser
def test_the_report_in_chromium(tmp_path: Path) -> None:
    from m2rl.envs.tools.browser import ChromiumHost

    shots = Path(os.environ.get("M2RL_VIEWER_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    episodes = [*played_episodes(), built_failed_episode()]
    summary = {"episodes": len(episodes), "resolved": 3, "resolved rate": 0.5, "95% CI": [0.19, 0.81],
               "mean turns": 2.3}
    report = write_report_html(tmp_path / "report.html", "eval: scripted experts on m2rl/Python-v0", summary, episodes)
    empty = write_report_html(tmp_path / "empty.html", "no episodes", {}, [])
    try:
        host = ChromiumHost()
    except Exception as exc:  # noqa: BLE001  (any launch failure: this machine cannot run the check)
        pytest.skip(f"Chromium cannot launch here: {type(exc).__name__}: {exc}")
    try:
        seen = host.loop.run(check_report(host.browser, report, empty, shots), timeout=180)
    finally:
        host.close()

    assert seen["problems"] == []
    assert {url for url in seen["requests"]} <= {report.as_uri(), empty.as_uri()}  # nothing else is fetched
    assert seen["empty"] == "0 of 0 episodes" and seen["all"] == "6 of 6 episodes"
    assert seen["title"].startswith("eval: scripted experts")
    assert seen["resolved"] == "3 of 6 episodes" and seen["unresolved"] == "3 of 6 episodes"
    assert seen["family collatz"] == "2 of 6 episodes" and seen["family none"] == "1 of 6 episodes"
    assert seen["any error"] == "2 of 6 episodes" and seen["tool errors"] == "2 of 6 episodes"
    assert seen["episode failed"] == "1 of 6 episodes" and seen["search"] == "1 of 6 episodes"
    assert seen["turns"] == 4  # the prompt and three sampled turns
    detail = seen["detail"]
    for text in ("ZeroDivisionError", "print(1 / 0)", "unknown_tool", "reward +0.050", "reward -0.050",
                 "I will compute this with the python tool.", INJECTION):
        assert text in detail, text
    assert seen["tool calls"] == ["python", "submit"] and seen["failed results"] == 1
    assert seen["injected img"] == 0 and seen["document title"].startswith("eval:")
    assert seen["chips before"] == 0  # the token view is built only when opened
    episode = episodes[4]["trajectory"]
    first_turn = [s for s in episode["spans"] if s["turn"] == 0 and s["kind"] != "prompt"]
    assert seen["chips sampled"] == first_turn[0]["end"] - first_turn[0]["start"] == seen["chips trained"]
    assert seen["chips env"] == first_turn[1]["end"] - first_turn[1]["start"]
    assert "loss mask 1" in seen["chip title"] and "policy v0" in seen["chip title"]
    assert seen["linked"].startswith("python/arith/9") and "sample 1" in seen["linked"]
    assert (shots / "list.png").stat().st_size > 10_000 and (shots / "trajectory.png").stat().st_size > 10_000
