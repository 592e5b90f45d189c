"""The reference workspace of docs/benchmarks.md, and the npm-like storm that runs in it.

Shape (from the BASELINES notes, so our numbers sit next to the floors and peers measured
there): 300 tracked sources (~1.7 MiB) in 51 non-ignored directories, committed; a ``node_modules/``
of 25,001 directories and 150,000 files; a ``.next/`` of 99 directories and 2,000 files; a
``.gitignore`` that leaves both out. Deterministic for a given seed, so two runs measure the same
tree.

Usable as a library (``generate``, ``storm``, ``pruned_dirs``, ``all_dirs``) and as a script::

    python bench/refworkspace.py generate DIR [--small]
    python bench/refworkspace.py storm DIR [--files 100000] [--seconds 20]

The storm prints one JSON line (what it did) and is meant to run as its own process, so that its
CPU time can be read from its rusage and compared with the daemon's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

IGNORED_TOPS = ("node_modules", ".next")
GITIGNORE = "node_modules/\n.next/\n*.log\n"

_WORDS = ("state", "props", "user", "session", "render", "fetch", "value", "index", "route",
          "theme", "config", "item", "list", "cache", "token", "query", "result", "error",
          "layout", "button", "modal", "form", "input", "field", "hook", "effect", "memo")
# A package's directories, relative to node_modules/<pkg>/ ("" is the package itself): 10 per
# package, so 2,500 packages make the 25,000 directories below node_modules/.
_PKG_DIRS = ("", "lib", "lib/internal", "dist", "dist/esm", "dist/cjs", "types", "src",
             "src/utils", "test")
# The 50 source directories below the root (the root makes 51).
_SRC_DIRS = (
    ["public", "public/images", "public/fonts", "scripts", "styles", "styles/components",
     "app", "app/api", "app/api/auth", "app/api/users", "app/(marketing)", "app/dashboard",
     "app/dashboard/settings", "app/dashboard/billing", "lib", "lib/db", "lib/auth", "hooks",
     "types", "tests", "tests/unit", "tests/e2e"]
    + [f"components/{c}" for c in ("ui", "forms", "layout", "charts", "nav", "modals",
                                   "tables", "cards")]
    + ["components"]
    + [f"src/{s}" for s in ("api", "store", "store/slices", "utils", "services", "models",
                            "i18n", "i18n/en", "i18n/de", "config", "middleware", "workers",
                            "features", "features/auth", "features/editor",
                            "features/editor/blocks", "features/billing", "features/search")]
    + ["src"]
)
assert len(_SRC_DIRS) == 50, len(_SRC_DIRS)


@dataclass(frozen=True)
class Shape:
    sources: int = 300
    source_bytes: int = 1_890_000  # gives ~1.7 MiB with this seed
    nm_packages: int = 2_500  # x 10 directories = 25,000 (+ node_modules/ itself)
    nm_files: int = 150_000
    next_leaf_dirs: int = 94  # + .next/, cache/, cache/webpack/, static/, static/chunks/ = 99
    next_files: int = 2_000


FULL = Shape()
SMALL = Shape(nm_packages=250, nm_files=15_000, next_files=200)


@dataclass
class Stats:
    root: str
    sources: int
    source_bytes: int
    source_dirs: int
    nm_dirs: int
    nm_files: int
    next_dirs: int
    next_files: int
    seconds: float


def _text(rng: random.Random, size: int) -> bytes:
    """Source-like text of about ``size`` bytes: varied enough that git cannot dedupe it away."""
    out: list[str] = []
    n = 0
    while n < size:
        a, b, c = rng.choice(_WORDS), rng.choice(_WORDS), rng.randrange(1 << 20)
        line = f"export const {a}{b.title()}{c} = use{b.title()}({a!r}, {c % 997});\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def generate(root: Path, shape: Shape = FULL, seed: int = 1) -> Stats:
    """Create the workspace in ``root`` (must not exist or be empty) and commit its sources."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise SystemExit(f"{root} is not empty")

    # Sources: spread over the root and the 50 directories, sizes varied around the mean.
    dirs = [root] + [root / d for d in _SRC_DIRS]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    (root / ".gitignore").write_text(GITIGNORE)
    (root / "package.json").write_text(json.dumps(
        {"name": "ref-app", "private": True, "scripts": {"dev": "next dev"}}, indent=2) + "\n")
    written = 2
    total = sum(len(p.read_bytes()) for p in (root / ".gitignore", root / "package.json"))
    mean = shape.source_bytes / shape.sources
    i = 0
    while written < shape.sources:
        d = dirs[i % len(dirs)]
        size = max(200, int(rng.uniform(0.2, 1.8) * mean))
        ext = rng.choice((".ts", ".tsx", ".js", ".css", ".json", ".md"))
        path = d / f"{rng.choice(_WORDS)}-{i}{ext}"
        data = _text(rng, size)
        path.write_bytes(data)
        total += len(data)
        written += 1
        i += 1

    # node_modules/: 2,500 packages of 10 directories, files spread evenly over them.
    nm = root / "node_modules"
    nm.mkdir()
    nm_dirs = [nm]
    for p in range(shape.nm_packages):
        base = nm / f"pkg-{p:05d}-{rng.choice(_WORDS)}"
        for sub in _PKG_DIRS:
            d = base / sub if sub else base
            d.mkdir(parents=True)
            nm_dirs.append(d)
    blob = _text(rng, 4096)
    for f in range(shape.nm_files):
        d = nm_dirs[1 + f % (len(nm_dirs) - 1)]
        size = 100 + (f * 7919) % 1900
        with open(d / f"m{f}.js", "wb") as fh:
            fh.write(blob[:size])

    # .next/: a build cache, 99 directories and 2,000 files.
    nx = root / ".next"
    next_dirs = [nx]
    for k in range(shape.next_leaf_dirs):
        d = nx / ("cache/webpack" if k % 2 else "static/chunks") / f"c{k:03d}"
        d.mkdir(parents=True)
        next_dirs.append(d)
    next_dir_count = sum(1 for _ in _walk_dirs(nx))
    for f in range(shape.next_files):
        d = next_dirs[1 + f % (len(next_dirs) - 1)]
        (d / f"{f:05x}.pack").write_bytes(blob[: 500 + f % 3000])

    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost",
           "-c", "init.defaultBranch=main", "-c", "core.hooksPath=/dev/null"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "reference workspace"], cwd=root, check=True)
    tracked = subprocess.run(["git", "ls-files"], cwd=root, check=True, capture_output=True,
                             text=True).stdout.split()
    assert len(tracked) == shape.sources, len(tracked)
    return Stats(str(root), len(tracked), total, len(pruned_dirs(root)), len(nm_dirs),
                 shape.nm_files, next_dir_count, shape.next_files,
                 round(time.perf_counter() - t0, 1))


def _walk_dirs(top: Path | str, skip: tuple[str, ...] = ()):
    """Every directory below and including ``top``, never entering ``.git`` or names in ``skip``."""
    stack = [str(top)]
    while stack:
        d = stack.pop()
        yield d
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False) and e.name != ".git" and e.name not in skip:
                    stack.append(e.path)


def pruned_dirs(root: Path | str) -> list[str]:
    """The directories git looks into: everything but .git, node_modules/ and .next/."""
    return list(_walk_dirs(root, IGNORED_TOPS))


def all_dirs(root: Path | str) -> list[str]:
    """Every directory but .git: what a recursive watcher (watchdog, gitwatch) watches."""
    return list(_walk_dirs(root))


def storm(root: Path, files: int = 100_000, seconds: float = 20.0, delete_fraction: float = 0.2,
          seed: int = 2) -> dict:
    """An ``npm install`` under node_modules/: new packages, some staged and renamed in, then a
    fifth of them removed again. Paced to last about ``seconds`` (creation in the first 85%).

    A package is 4 directories and 20 files, so 100,000 files are 5,000 packages and 20,000 new
    directories. Every fourth package is written under ``node_modules/.staging/`` and renamed into
    place, as npm's older installers did.
    """
    rng = random.Random(seed)
    nm = Path(root) / "node_modules"
    staging = nm / ".staging"
    staging.mkdir(exist_ok=True)
    per_pkg, layout = 20, ("", "lib", "dist", "types")
    packages = max(1, files // per_pkg)
    blob = _text(rng, 4096)
    t0 = time.monotonic()
    create_until = seconds * 0.85
    made: list[Path] = []
    created = 0
    for p in range(packages):
        name = f"storm{os.getpid()}-{p:05d}-{rng.choice(_WORDS)}"  # reruns do not collide
        staged = p % 4 == 0
        base = (staging if staged else nm) / name
        for sub in layout:
            (base / sub if sub else base).mkdir(parents=True, exist_ok=True)
        for f in range(per_pkg):
            sub = layout[f % len(layout)]
            with open((base / sub if sub else base) / f"f{f}.js", "wb") as fh:
                fh.write(blob[: 150 + (f * 131) % 2500])
            created += 1
        if staged:
            os.rename(base, nm / name)
        made.append(nm / name)
        # Pace: never ahead of the schedule (behind it, go as fast as we can).
        ahead = t0 + create_until * (p + 1) / packages - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    created_s = time.monotonic() - t0
    doomed = rng.sample(made, int(len(made) * delete_fraction))
    for k, d in enumerate(doomed):
        shutil.rmtree(d)
        due = create_until + (seconds - create_until) * (k + 1) / len(doomed)
        ahead = t0 + due - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    staging.rmdir()
    return {"files_created": created, "dirs_created": packages * len(layout),
            "packages_removed": len(doomed), "files_removed": len(doomed) * per_pkg,
            "create_s": round(created_s, 2), "total_s": round(time.monotonic() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="create the reference workspace in DIR")
    g.add_argument("dir", type=Path)
    g.add_argument("--small", action="store_true", help="a tenth of node_modules/ (for trying out)")
    s = sub.add_parser("storm", help="run the npm-like storm in DIR/node_modules")
    s.add_argument("dir", type=Path)
    s.add_argument("--files", type=int, default=100_000)
    s.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args(argv)
    if args.cmd == "generate":
        print(json.dumps(asdict(generate(args.dir, SMALL if args.small else FULL))))
    else:
        print(json.dumps(storm(args.dir, args.files, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
