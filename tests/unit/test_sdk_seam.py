"""The SDK seam: private singer-sdk names live only in target_orb/singer/sdk_seam.py, and every SDK
function it copies or replaces is pinned, so a singer-sdk upgrade fails here by name."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
from pathlib import Path

import pytest
import singer_sdk

import target_orb
from target_orb.singer import sdk_seam

PACKAGE = Path(target_orb.__file__).parent

# SDK function -> (sha256 prefix of its source in singer-sdk 0.54.x, what depends on it).
# When one fails: read the SDK's change, port it to target_orb/singer/sdk_seam.py (the item named),
# run the benchmark and the integration tests, then update the hash here.
PINNED = {
    "singer_sdk.target_base:Target._process_record_message": (
        "08aaf4096e2d39e7", "item 5: SeamTarget._process_record_message is a trimmed copy"),
    "singer_sdk.target_base:Target._process_schema_message": (
        "ed6e8449bc8ff234", "item 4: extended; the fast path assumes how it registers sinks"),
    "singer_sdk.target_base:Target.drain_all": (
        "1da0109210d345c4", "item 3: STATE goes through _write_state_message after draining"),
    "singer_sdk.target_base:Target._handle_max_record_age": (
        "5762750ab1035404", "items 1 and 5: the max-age drain the fast path calls"),
    "singer_sdk.plugin_base:PluginBase._validate_config": (
        "0584b9e347e353fa", "item 2: called for its schema errors, raising (no WARNING)"),
    "singer_sdk.plugin_base:PluginBase._env_var_config": (
        "4e00272a5767a9a1", "item 12: replaced by SeamTarget._env_var_config"),
    "singer_sdk.configuration._dict_config:parse_environment_config": (
        "8795a086c3e468a6", "item 12: structured settings handed to it typed as text"),
    "singer_sdk.plugin_base:PluginBase._setup_signal_handlers": (
        "eb4287001bdd7d19", "TargetOrb.__init__ replaces the handlers it installs"),
    "singer_sdk.sinks.core:Sink._validate_and_parse": (
        "970aadabcc4da8c7", "item 6: replaced by SeamSink._validate_and_parse"),
    "singer_sdk.sinks.core:Sink._singer_validate_message": (
        "018b08ee7f624f61", "item 5: the key-property error the fast path raises"),
    "singer_sdk.sinks.core:Sink.tally_record_read": (
        "b1cfae5f7a3fab1f", "item 5: inlined in the fast path"),
    "singer_sdk.sinks.core:Sink._remove_sdc_metadata_from_record": (
        "7cd9e5fb192f13ec", "item 9: extended by SeamSink to keep _sdc_deleted_at"),
    "singer_sdk.sinks.core:Sink.is_full": (
        "662da81db8ad2d5a", "item 7: replaced by SeamSink.is_full"),
    "singer_sdk.sinks.batch:BatchSink._get_context": (
        "4e0d39040097dc9b", "item 5: the fast path reads _pending_batch first"),
    "singer_sdk.singerlib.encoding.base:GenericSingerReader.process_lines": (
        "f6d848854616d1d8", "item 8: SeamMessageReader.process_lines is a copy"),
    "singer_sdk.contrib.msgspec:MsgSpecReader.deserialize_json": (
        "eec0fe447cd2ae9e", "item 8: the copy decodes with the same decoder"),
}


def _sdk_function(name: str):
    module_name, qualname = name.split(":")
    if "." not in qualname:
        return getattr(importlib.import_module(module_name), qualname)
    owner_name, attr = qualname.split(".")
    owner = getattr(importlib.import_module(module_name), owner_name)
    member = owner.__dict__[attr]
    return member.fget if isinstance(member, property) else member


@pytest.mark.parametrize("name", sorted(PINNED))
def test_sdk_function_the_seam_depends_on_is_unchanged(name):
    expected, why = PINNED[name]
    source = inspect.getsource(_sdk_function(name))
    actual = hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]
    assert actual == expected, (
        f"singer-sdk {importlib.metadata.version('singer-sdk')} changed {name} ({why}). "
        "Read the change, port it to target_orb/singer/sdk_seam.py, then "
        f"update its hash in tests/unit/test_sdk_seam.py to {actual}."
    )


@functools.cache
def _sdk_private_names() -> frozenset[str]:
    """Every single-underscore name the SDK defines or uses as an attribute."""
    names: set[str] = set()
    for path in Path(singer_sdk.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name):
                names.add(node.id)
    return frozenset(n for n in names if n.startswith("_") and not n.startswith("__"))


def _private_sdk_uses(source: str, sdk_private: frozenset[str]) -> set[str]:
    tree = ast.parse(source)
    uses: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("singer_sdk"):
            uses |= {f"import {a.name}" for a in node.names if a.name.startswith("_")}
        elif isinstance(node, ast.Attribute) and node.attr in sdk_private:
            uses.add(node.attr)
        elif isinstance(node, ast.FunctionDef) and node.name in sdk_private:
            uses.add(f"def {node.name}")
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.Assign | ast.AnnAssign):
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                    uses |= {
                        f"attribute {t.id}" for t in targets
                        if isinstance(t, ast.Name) and t.id in sdk_private
                    }
    return uses


def test_only_the_seam_uses_private_sdk_names():
    sdk_private = _sdk_private_names()
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() in {"singer/sdk_seam.py", "fake_orb.py"}:
            continue
        source = path.read_text(encoding="utf-8")
        if "singer_sdk" not in source:
            continue  # a module that never touches the SDK cannot reach its privates
        uses = _private_sdk_uses(source, sdk_private)
        if uses:
            offenders[path.name] = sorted(uses)
    assert offenders == {}, (
        "private singer-sdk names outside target_orb/singer/sdk_seam.py; move each use into the "
        f"seam and document it there: {offenders}"
    )


def test_the_seam_docstring_names_every_private_sdk_name_it_uses():
    sdk_private = _sdk_private_names()
    source = Path(sdk_seam.__file__).read_text(encoding="utf-8")
    used = {u.split()[-1] for u in _private_sdk_uses(source, sdk_private)}
    own = {"_seam_max_size", "_fast_sinks"}  # the seam's own attributes
    missing = sorted(n for n in used - own if n not in (sdk_seam.__doc__ or ""))
    assert missing == [], f"document these in target_orb/singer/sdk_seam.py's docstring: {missing}"


def test_the_seam_guard_would_catch_a_private_use():
    sample = (
        "from singer_sdk.plugin_base import _ConfigInput\n"
        "class T:\n"
        "    _MAX_RECORD_AGE_IN_MINUTES = 1.0\n"
        "    def _write_state_message(self, state): self._sinks_active.clear()\n"
    )
    uses = _private_sdk_uses(sample, _sdk_private_names())
    assert uses == {
        "import _ConfigInput", "attribute _MAX_RECORD_AGE_IN_MINUTES",
        "def _write_state_message", "_sinks_active",
    }
