"""Writes docs/choices.md, every closed set of config values, from the sets the code validates against
(`validate.RULES` over `talklora_exp.choices`, the method peft configs' `choices`), so the docs cannot drift from them.

    python scripts/choices_doc.py          # rewrite docs/choices.md
    python scripts/choices_doc.py --check  # exit 1 if it is stale (tests/test_docs.py runs this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from talklora_exp.choices import ADAPTER_DTYPES
from talklora_exp.methods import METHODS
from talklora_exp.validate import RULES

DOC = Path(__file__).resolve().parents[1] / "docs" / "choices.md"


def _values(allowed: tuple) -> str:
    return ", ".join("`null`" if v is None else f"`{v}`" for v in allowed)


def render() -> str:
    """The page: one row per field with a closed set of values."""
    rows = [(key, _values(allowed), "all") for key, (kind, allowed) in RULES.items() if kind.startswith("choice")]
    per_field: dict[str, tuple[tuple, list[str]]] = {}
    for name, method in sorted(METHODS.items()):
        own = getattr(method.config_cls, "choices", {}) if method.config_cls is not None else {}
        for key, allowed in {"adapter_dtype": ADAPTER_DTYPES, **own}.items():
            per_field.setdefault(key, (allowed, []))[1].append(name)
    rows += [(f"method.{k}", _values(a), ", ".join(f"`{m}`" for m in ms)) for k, (a, ms) in sorted(per_field.items())]
    out = [
        "# Config choices",
        "",
        "Every config field with a closed set of values, and the values allowed. Generated from the sets the code",
        "validates against (`src/talklora_exp/choices.py`, the method peft configs' `choices`) by",
        "`python scripts/choices_doc.py`; a test fails when this page is stale. Any other value is rejected before",
        "anything runs, with one line naming the field, the value and this list.",
        "",
        "| field | allowed | methods |",
        "|---|---|---|",
    ]
    out += [f"| `{k}` | {v} | {m} |" for k, v, m in rows]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/choices.md differs from the code's sets")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"error: {DOC} is stale; run: python scripts/choices_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
