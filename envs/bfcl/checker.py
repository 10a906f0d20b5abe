"""The parts of `bfcl-eval` the env uses, imported narrowly, and BFCL's own graders around them.

`bfcl-eval` (the Berkeley Function Calling Leaderboard, v4) pins an old numpy, faiss, sentence-transformers
and a dozen vendor SDKs for its model handlers. None of that is needed to load its data and run its checkers,
so it is installed with `pip install --no-deps bfcl-eval` plus small packages (`tree_sitter==0.21.3`,
`tree-sitter-java`, `tree-sitter-javascript`: its Java/JS call parsers, imported by the module holding its
tool-schema converter; `filelock`, `mpmath`, `tenacity`: pyproject's `bfcl` extra) and only these submodules
are imported (docs/benchmark_envs.md):

- `bfcl_eval.utils`: the data loaders (`load_dataset_entry`, `load_ground_truth_entry`);
- `bfcl_eval.model_handler.utils`: `convert_to_tool` (BFCL function docs -> OpenAI tools) and
  `convert_to_function_call` (decoded calls -> the executable strings its backends take);
- `bfcl_eval.eval_checker.ast_eval.ast_checker`: the single-turn AST checker;
- `bfcl_eval.eval_checker.multi_turn_eval`: the executable backends (file system, math, messaging, posting,
  tickets, trading, travel, vehicle), `execute_multi_turn_func_call` and `multi_turn_checker` (state and
  response checks).

The one thing not imported is BFCL's model registry (`bfcl_eval.constants.model_config`), which imports every
vendor SDK to build its handlers. The AST checker reads a single field of it, `underscore_to_dot` of the model
under test (whether that model saw `math.factorial` as `math_factorial`). The policy here sees BFCL's names
with dots replaced (as BFCL shows them to every OpenAI-style model), so m2rl's entry says True. When the
process has already imported the real registry, m2rl's entry is added to it; otherwise a module holding only
m2rl's entry stands in for it (importing the real one would cost seconds of vendor SDKs where they are
installed, and fails where they are not). The checkers themselves run unchanged.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_NAME = "m2rl-policy"  # the name BFCL's checkers see (its registry key; no "_": BFCL maps "_" to "/")
LOCK_DIR_ROOT = Path(os.environ.get("M2RL_CACHE", Path.home() / ".cache" / "m2rl")) / "bfcl"


class BFCLNotInstalled(ImportError):
    pass


@dataclass(frozen=True)
class M2RLModelConfig:
    """m2rl's entry in BFCL's model registry: the one field its checkers read."""

    underscore_to_dot: bool = True


def _register_model() -> None:
    entry = M2RLModelConfig()
    registry = sys.modules.get("bfcl_eval.constants.model_config")
    if registry is None:  # not imported yet: importing it would load every vendor SDK (seconds, if they exist)
        registry = types.ModuleType("bfcl_eval.constants.model_config")
        registry.__doc__ = "m2rl: BFCL's model registry holding only m2rl's entry (see m2rl/envs/bfcl/checker.py)"
        registry.MODEL_CONFIG_MAPPING = {}  # type: ignore[attr-defined]
        sys.modules["bfcl_eval.constants.model_config"] = registry
    registry.MODEL_CONFIG_MAPPING[MODEL_NAME] = entry  # type: ignore[attr-defined]


def load() -> types.SimpleNamespace:
    """Import the BFCL modules the env uses (once); `BFCLNotInstalled` says how to install them."""
    global _BFCL
    if _BFCL is not None:
        return _BFCL
    # BFCL writes file locks next to its "project root" (by default inside site-packages): keep them in the cache.
    os.environ.setdefault("BFCL_PROJECT_ROOT", str(LOCK_DIR_ROOT))
    try:
        import bfcl_eval  # noqa: F401

        _register_model()
        from bfcl_eval import utils
        from bfcl_eval.constants import category_mapping, default_prompts, enums, type_mappings
        from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
        from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils
        from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker
        from bfcl_eval.model_handler.utils import convert_to_function_call, convert_to_tool
    except ImportError as exc:
        raise BFCLNotInstalled(
            f"bfcl-eval is not usable ({exc}); install it with scripts/setup.sh, or `pip install --no-deps "
            "bfcl-eval==2026.3.23` and `pip install filelock mpmath tenacity tree_sitter==0.21.3 "
            "tree-sitter-java==0.21.0 tree-sitter-javascript==0.21.4` (pyproject's `bfcl` extra)"
        ) from exc
    LOCK_DIR_ROOT.joinpath(".file_locks").mkdir(parents=True, exist_ok=True)
    _BFCL = types.SimpleNamespace(
        utils=utils, categories=category_mapping, prompts=default_prompts, enums=enums,
        type_mappings=type_mappings, class_paths=CLASS_FILE_PATH_MAPPING, ast_checker=ast_checker,
        multi_turn_utils=multi_turn_utils, multi_turn_checker=multi_turn_checker,
        convert_to_function_call=convert_to_function_call, convert_to_tool=convert_to_tool,
    )
    return _BFCL


_BFCL: types.SimpleNamespace | None = None


def available() -> bool:
    try:
        load()
        return True
    except BFCLNotInstalled:
        return False


# ------------------------------------------------------------------------------------------------ grading


def language_of(category: str) -> Any:
    enums = load().enums
    if category == "simple_java":
        return enums.Language.JAVA
    if category == "simple_javascript":
        return enums.Language.JAVASCRIPT
    return enums.Language.PYTHON


def check_single_turn(functions: list[dict[str, Any]], answer: dict[str, Any] | None, category: str,
                      calls: list[dict[str, dict[str, Any]]], abstained: bool) -> dict[str, Any]:
    """BFCL's verdict on one single-turn entry, as its eval runner computes it (`_evaluate_single_ast_entry`,
    `_evaluate_single_relevance_entry`): `{"valid": bool, ...}`.

    `calls` are the decoded calls `[{name: {param: value}}]` (BFCL's `decode_ast` form for FC models);
    `abstained` is whether the reply held no call at all (irrelevance / relevance categories); `functions` are
    the entry's function docs as the checker reads them (tasks.checked_functions)."""
    if "irrelevance" in category:
        return {"valid": abstained} if abstained else {
            "valid": False, "error_type": "irrelevance_error:decoder_success",
            "error": ["Valid syntax. Successfully decode AST when it should not."]}
    if "relevance" in category:
        return {"valid": not abstained} if not abstained else {
            "valid": False, "error_type": "relevance_error:decoder_failed",
            "error": ["Invalid syntax. Failed to decode AST when it should have."]}
    assert answer is not None, f"{category} entry without a possible answer"
    bfcl = load()
    return bfcl.ast_checker(functions, calls, answer["ground_truth"], language_of(category),
                            category, MODEL_NAME)


def check_multi_turn(entry: dict[str, Any], ground_truth: list[list[str]], decoded: list[list[list[str]]],
                     episode_model: str) -> dict[str, Any]:
    """BFCL's `multi_turn_checker` on the calls each step of each turn executed (`decoded[turn][step]` =
    executable call strings), as `_evaluate_single_multi_turn_entry` calls it; the checker replays them and the
    ground truth on fresh backend instances and compares their state and responses turn by turn."""
    if len(decoded) != len(ground_truth):
        return {"valid": False, "error_type": "multi_turn:force_terminated",
                "error_message": f"{len(decoded)} of {len(ground_truth)} turns were played"}
    bfcl = load()
    category = entry["id"].rsplit("_", 1)[0]
    try:
        return bfcl.multi_turn_checker(decoded, ground_truth, entry, category, episode_model)
    finally:
        drop_instances(episode_model)


def execute(calls: list[str], entry: dict[str, Any], episode_model: str) -> list[str]:
    """Run executable call strings on the episode's BFCL backend instances (created on first use from the
    entry's initial config, then kept: state carries across steps and turns); one result string per call."""
    bfcl = load()
    category = entry["id"].rsplit("_", 1)[0]
    results, _ = bfcl.multi_turn_utils.execute_multi_turn_func_call(
        calls, entry.get("initial_config", {}), entry["involved_classes"], episode_model, entry["id"],
        long_context=("long_context" in category or "composite" in category), is_evaL_run=False)
    return [str(r) for r in results]


def drop_instances(episode_model: str) -> None:
    """BFCL keeps backend instances in `multi_turn_utils`' module globals, keyed by model name and entry id, for
    the life of the process; each episode uses its own model name, and this forgets its instances."""
    namespace = vars(load().multi_turn_utils)
    prefix = episode_model.replace("-", "_").replace(".", "_").replace("/", "_").replace(":", "_") + "_"
    for name in [n for n in namespace if n.startswith(prefix)]:
        namespace.pop(name, None)
