"""A seeded mutation fuzzer over every shipped topology YAML, at the level of the file's text.

Each mutant is one shipped file (``topologies/**/*.yaml``) with one or two edits to its text:
deep nesting (flow ``[[[…]]]`` and block mappings), YAML tags (``!!float 'abc'``, ``!!binary``,
``!!python/object``…), anchors and aliases (billion laughs, recursive aliases, merges), duplicate
keys, random bytes, truncation, line edits, numbers made non-finite or huge, junk values, and the
sizes that used to hang (an ``over`` list of 2,000 names, a billion replicas, a 3×100000×100000
image). A mutant must be either accepted or refused with one ``error: place: message`` line
(exit 2); anything else is a crash, and one that runs past the time limit a hang.

    python -m tests.fuzz_yaml --mutants 1100            # the figures: mutants, clear errors, accepted, crashes, hangs
    python -m tests.fuzz_yaml --mutants 200 --show 5    # print a few mutants of each outcome

``--dry-forward`` sets the share of mutants checked as ``online-kd validate`` does (load, checks and
the dry forward, in-process through ``online_kd.cli.main``); the others only load and check.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = sorted((ROOT / "topologies").glob("**/*.yaml"))

#: 'error: place: message' on one line
ERROR_LINE = re.compile(r"^error: \S[^\n]*: [^\n]+\n?$")
_VALUE_LINE = re.compile(r"^(\s*(?:- )?[\w\-]+:[ \t]+)(\S.*)$")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])")

TAGS = ["!!float", "!!int", "!!bool", "!!null", "!!str", "!!binary", "!!timestamp", "!!set", "!!omap", "!!pairs",
        "!!map", "!!seq", "!!python/object:os.system", "!!python/name:os.system", "!custom", "!"]
TAG_VALUES = ["'abc'", "'1e999'", "''", "2020-13-45", "'2020-01-01'", "{a: 1}", "[1, 2]", "'=='", "x", "'0x1G'"]
NUMBERS = [".inf", "-.inf", ".nan", "1e999", "'1e999'", "1.0e+999", "'inf'", "0", "-1", "-0.0", "1000000000",
           "1000000000000000000000000000000", "0x10", "0o17", "1_000", "1.5", "'12'", "true", "null"]
JUNK = ["[]", "{}", "null", "~", "'", '"', "*undefined", "&a", "|", ">", "[a, {b: c}]", "{a: [}", "x" * 300,
        "- a", "? a", "@x", "`x`", "%TAG", "é☃", "\t1", "'a\\nb'"]


def _lines_with_values(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if _VALUE_LINE.match(line) and not line.lstrip().startswith("#")]


def _replace_value(text: str, rng: random.Random, new: str) -> str:
    lines = text.split("\n")
    idx = _lines_with_values(lines)
    if not idx:
        return text + f"\ndescription: {new}\n"
    i = rng.choice(idx)
    lines[i] = _VALUE_LINE.sub(lambda m: m.group(1) + new, lines[i])
    return "\n".join(lines)


def nest_flow(text, rng):
    depth = rng.choice([8, 31, 33, 100, 500, 3000])
    return _replace_value(text, rng, "[" * depth + "]" * depth), f"flow nesting {depth}"


def nest_block(text, rng):
    depth = rng.choice([10, 31, 40, 1000])
    key = rng.choice(["description", "data", "extra", "peers"])
    block = "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "v: 1\n"
    return text.rstrip("\n") + f"\n{key}:\n" + "".join("  " + line + "\n" for line in block.splitlines()), \
        f"block nesting {depth} under {key}"


def tag(text, rng):
    t, v = rng.choice(TAGS), rng.choice(TAG_VALUES)
    if rng.random() < 0.5:
        lines = text.split("\n")
        idx = _lines_with_values(lines)
        i = rng.choice(idx)
        lines[i] = _VALUE_LINE.sub(lambda m: f"{m.group(1)}{t} {m.group(2)}", lines[i])
        return "\n".join(lines), f"tag {t} on line {i + 1}"
    return _replace_value(text, rng, f"{t} {v}"), f"tag value {t} {v}"


def anchors(text, rng):
    kind = rng.choice(["laughs", "recursive", "copy", "merge", "undefined", "deep_alias"])
    if kind == "laughs":
        n = rng.choice([5, 9, 12])
        bomb = "[" + ", ".join(["lol"] * 9) + "]"
        lines = [f"l0: &l0 {bomb}"] + [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, n)]
        where = rng.choice(["description", "extra", "model_args"])
        if where == "model_args" and "model_args:" not in text and "model:" in text:
            text = re.sub(r"(model: [^,}\n]+)", r"\1, model_args: {x: *l%d}" % (n - 1), text, count=1)
            return "bombs:\n" + "".join(f"  {line}\n" for line in lines) + text, f"billion laughs {n} in model_args"
        return text.rstrip("\n") + f"\n{where}:\n" + "".join(f"  {line}\n" for line in lines), f"billion laughs {n}"
    if kind == "recursive":
        return _replace_value(text, rng, "&r [*r]"), "recursive alias"
    if kind == "undefined":
        return _replace_value(text, rng, "*nowhere"), "undefined alias"
    if kind == "deep_alias":
        chain = "d0: &d0 [[[[[[1]]]]]]\n" + "".join(f"  d{i}: &d{i} [[[[*d{i - 1}]]]]\n" for i in range(1, 10))
        return text.rstrip("\n") + "\ndescription:\n  " + chain, "aliases nesting deeper than the text"
    lines = text.split("\n")
    idx = _lines_with_values(lines)
    src, dst = rng.choice(idx), rng.choice(idx)
    lines[src] = _VALUE_LINE.sub(lambda m: f"{m.group(1)}&x {m.group(2)}", lines[src])
    if kind == "copy":
        lines[dst] = _VALUE_LINE.sub(lambda m: f"{m.group(1)}*x", lines[dst])
    else:
        indent = re.match(r"\s*(?:- )?", lines[dst]).group(0).replace("-", " ")
        lines.insert(dst + 1, f"{indent}<<: *x")
    return "\n".join(lines), f"{kind} anchor line {src + 1} → line {dst + 1}"


def duplicate_key(text, rng):
    lines = text.split("\n")
    flows = [i for i, line in enumerate(lines) if re.search(r"\{\s*[\w\-]+:", line)]
    if flows and rng.random() < 0.4:
        i = rng.choice(flows)
        m = re.search(r"\{\s*([\w\-]+):\s*([^,}]*)", lines[i])
        lines[i] = lines[i][:m.end()] + f", {m.group(1)}: {rng.choice(['1', '999', m.group(2) or 'x'])}" + lines[i][m.end():]
        return "\n".join(lines), f"duplicate flow key {m.group(1)} line {i + 1}"
    idx = _lines_with_values(lines)
    i = rng.choice(idx)
    lines.insert(i + 1, lines[i] if rng.random() < 0.5 else _VALUE_LINE.sub(lambda m: m.group(1) + "999", lines[i]))
    return "\n".join(lines), f"duplicate key line {i + 1}"


def random_bytes(text, rng):
    data = text.encode()
    kind = rng.choice(["random", "invalid_utf8", "nul", "bom", "control", "utf16"])
    at = rng.randrange(len(data) + 1)
    if kind == "utf16":
        return text.encode("utf-16"), "utf-16 with BOM"
    insert = {"random": bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))), "invalid_utf8": b"\xff\xfe\xc3",
              "nul": b"\x00", "bom": b"\xef\xbb\xbf", "control": bytes([rng.choice([1, 7, 8, 11, 12, 27, 127])])}[kind]
    return data[:at] + insert + data[at:], f"{kind} bytes at {at}"


def truncate(text, rng):
    at = rng.randrange(len(text))
    return text[:at], f"truncated at {at}"


def line_edit(text, rng):
    lines = text.split("\n")
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    op = rng.choice(["delete", "duplicate", "swap", "indent", "dedent", "tab"])
    if op == "delete":
        del lines[i]
    elif op == "duplicate":
        lines.insert(j, lines[i])
    elif op == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "indent":
        lines[i] = " " * rng.choice([1, 2, 3, 8]) + lines[i]
    elif op == "dedent":
        lines[i] = lines[i].lstrip()
    else:
        lines[i] = "\t" + lines[i]
    return "\n".join(lines), f"line {op} {i + 1}"


def number(text, rng):
    spans = [m.span() for m in _NUMBER.finditer(text)]
    if not spans:
        return text, "no number"
    a, b = rng.choice(spans)
    new = rng.choice(NUMBERS)
    return text[:a] + new + text[b:], f"number {text[a:b]!r} → {new}"


def junk(text, rng):
    new = rng.choice(JUNK)
    return _replace_value(text, rng, new), f"value → {new[:20]!r}"


def big(text, rng):
    kind = rng.choice(["over", "to", "replicas", "shape", "batch", "num_train", "image_size", "epochs", "workers",
                       "colocate"])
    if kind == "over":
        names = ", ".join(f"n{i}" for i in range(rng.choice([70, 2000])))
        new, n = re.subn(r"over: \[[^\]]*\]", f"over: [{names}]", text, count=1)
        if n:
            return new, f"over with {names.count(',') + 1} names"
        kind = "to"
    if kind == "to":
        names = ", ".join(f"n{i}" for i in range(5000))
        return re.sub(r"to: [\w\-]+", f"to: [{names}]", text, count=1), "to with 5000 names"
    if kind == "replicas":
        count = rng.choice([1000000000, 1025, 64, -1])
        return re.sub(r"(model: [^,}\n]+)", rf"\1, replicas: {count}", text, count=1) + "\nengine: {name: ray}\n", \
            f"replicas {count} on ray"
    if kind == "workers":
        return text.rstrip("\n") + "\nengine: {name: ray, resources_per_worker: {CPU: -1, GPU: 1e999}}\n", "bad resources"
    if kind == "colocate":
        return text.rstrip("\n") + "\nengine: {name: ray, colocate: [[a, a], [nobody]]}\n", "bad colocate"
    value = {"shape": "{dataset: synthetic, synthetic: {shape: [3, 100000, 100000]}}",
             "batch": "{dataset: digits, batch_size: 100000000000}",
             "num_train": "{dataset: synthetic, synthetic: {num_train: 100000000000000}}",
             "image_size": "{dataset: imagefolder, root: /nonexistent, image_size: 1000000}",
             "epochs": "{dataset: digits}\ntrain: {epochs: 1000000000000000000000000}"}[kind]
    new, n = re.subn(r"^data:.*$", lambda m: "data: " + value, text, count=1, flags=re.M)
    return (new if n else text), kind


MUTATORS = [nest_flow, nest_block, tag, anchors, duplicate_key, random_bytes, truncate, line_edit, number, junk, big]


def mutant(seed: int, i: int) -> tuple[Path, bytes, str]:
    """Mutant ``i`` of ``seed``: (the shipped file it came from, its bytes, what was done)."""
    rng = random.Random(f"{seed}/{i}")
    source = TOPOLOGIES[i % len(TOPOLOGIES)]
    data: str | bytes = source.read_text()
    done = []
    for _ in range(rng.choice([1, 1, 2])):
        if isinstance(data, bytes):
            break
        fn = rng.choice(MUTATORS)
        try:
            data, what = fn(data, rng)
        except (IndexError, AttributeError):  # nothing for it to edit (e.g. a truncated file without values)
            what = "nothing to edit"
        done.append(f"{fn.__name__}: {what}")
    return source, data if isinstance(data, bytes) else data.encode(), "; ".join(done)


class Hang(BaseException):
    """Raised by the alarm: a mutant ran past the time limit (a BaseException, so no handler swallows it)."""


def _alarm(signum, frame):
    raise Hang()


@dataclass
class Outcome:
    kind: str  # accepted | clear | crash | hang
    detail: str
    seconds: float


def check(path: Path, dry_forward: bool, limit: float = 30.0) -> Outcome:
    """Load one file as ``online-kd validate`` would (``dry_forward``) or only load and check it."""
    from online_kd.cli import main
    from online_kd.data import DataError
    from online_kd.errors import TopologyError
    from online_kd.topology import load_topology

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    start = time.perf_counter()
    out, err = io.StringIO(), io.StringIO()
    try:
        if dry_forward:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(["validate", str(path)])
            text = err.getvalue()
            if rc == 0:
                return Outcome("accepted", out.getvalue().strip(), time.perf_counter() - start)
            ok = rc == 2 and ERROR_LINE.match(text) is not None
            return Outcome("clear" if ok else "crash", f"rc={rc}: {text.strip()[:300]}", time.perf_counter() - start)
        try:
            load_topology(path)
        except (TopologyError, DataError) as e:
            line = f"error: {e}\n"
            return Outcome("clear" if ERROR_LINE.match(line) else "crash", line.strip(), time.perf_counter() - start)
        return Outcome("accepted", "", time.perf_counter() - start)
    except Hang:
        return Outcome("hang", f"over {limit:.0f} s", time.perf_counter() - start)
    except SystemExit as e:  # argparse
        return Outcome("crash", f"SystemExit {e.code}: {err.getvalue().strip()[:300]}", time.perf_counter() - start)
    except Exception as e:  # the defect the fuzzer looks for
        return Outcome("crash", f"{type(e).__name__}: {str(e)[:300]}", time.perf_counter() - start)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run(mutants: int, seed: int = 0, dry_forward: float = 0.25, limit: float = 30.0, workdir: Path | None = None):
    """Check ``mutants`` mutants; yields (index, source, what was done, outcome)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-yaml-", dir=workdir) as tmp:
        for i in range(mutants):
            source, data, what = mutant(seed, i)
            path = Path(tmp) / f"{i:05d}-{source.parent.name}-{source.name}"
            path.write_bytes(data)
            rng = random.Random(f"{seed}/{i}/forward")
            yield i, source, what, check(path, rng.random() < dry_forward, limit)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutants", type=int, default=1100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-forward", type=float, default=0.25, help="share of mutants validated with the dry forward")
    ap.add_argument("--limit", type=float, default=30.0, help="seconds before a mutant counts as a hang")
    ap.add_argument("--show", type=int, default=0, help="print this many mutants of each outcome")
    args = ap.parse_args(argv)
    counts: Counter = Counter()
    shown: Counter = Counter()
    slowest = 0.0
    start = time.perf_counter()
    for i, source, what, out in run(args.mutants, args.seed, args.dry_forward, args.limit):
        counts[out.kind] += 1
        slowest = max(slowest, out.seconds)
        if out.kind in ("crash", "hang") or shown[out.kind] < args.show:
            shown[out.kind] += 1
            print(f"[{out.kind}] #{i} {source.relative_to(ROOT)} ({what}): {out.detail}", flush=True)
    print(f"mutants {args.mutants} of {len(TOPOLOGIES)} shipped YAMLs (seed {args.seed}): "
          f"clear errors {counts['clear']}, accepted {counts['accepted']}, crashes {counts['crash']}, "
          f"hangs over {args.limit:.0f} s {counts['hang']}; slowest {slowest:.1f} s, total {time.perf_counter() - start:.0f} s")
    return 1 if counts["crash"] or counts["hang"] else 0


if __name__ == "__main__":
    sys.exit(main())
