#!/usr/bin/env python3
"""Finds import circles between the modules of each Rust crate in the repository.

A module that imports from another module which imports it back, directly or through others,
cannot be read or changed on its own. This reads every non-test `.rs` file of a crate, resolves
each `use` (and each `crate::`/`super::` path in code) to the module that defines the item,
following `pub use` re-exports, and looks for cycles at every depth of the module tree: at depth
1 a whole top-level module (all its children with it) is one node, at depth 2 each of their
children is its own node, and so on, so `a -> b::x` and `b::y -> a` is a circle between `a` and
`b` even though no single file imports one that imports it back. A module and the modules it
contains are one thing seen from outside: a child using its parent's items (`use super::X`) and
the parent using or re-exporting the child's is how Rust nests modules, not a circle.

Test code is left out: files named `tests.rs`, `*_tests.rs` or under `tests/`, and
`#[cfg(test)] mod` blocks. The crate root (lib.rs, main.rs) is a facade: its re-exports are not
edges. Usage: module-cycles.py CRATE_SRC_DIR...; exits 1 naming every circle it found.
"""

import re
import sys
from pathlib import Path

COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
STRING = re.compile(r'"(?:\\.|[^"\\])*"')
CFG_TEST_MOD = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*")
USE = re.compile(r"\b(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);")
PATH = re.compile(r"\b(?:crate|super|self)(?:::\w+)+")
MOD_DECL = re.compile(r"\bmod\s+(\w+)\s*[;{]")


def strip(text):
    text = COMMENT.sub("", text)
    text = STRING.sub('""', text)
    out, i = [], 0
    for m in CFG_TEST_MOD.finditer(text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        j = m.end()
        if j < len(text) and text[j] == "{":
            depth = 0
            while j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
                if depth == 0:
                    break
        elif j < len(text) and text[j] == ";":
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def expand(tree):
    """`a::{b, c::{d, e as f}}` -> [[a, b], [a, c, d], [a, c, e]]."""
    tree = re.sub(r"\s+as\s+\w+", "", tree)
    tree = re.sub(r"\s+", "", tree)
    if "{" not in tree:
        return [[s for s in tree.split("::") if s]]
    head, rest = tree.split("{", 1)
    body = rest[: rest.rfind("}")]
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        cur += ch
    parts.append(cur)
    prefix = [s for s in head.split("::") if s]
    out = []
    for p in parts:
        if not p:
            continue
        for sub in expand(p):
            out.append(prefix + sub)
    return out


def is_test_file(rel):
    return rel.name == "tests.rs" or rel.name.endswith("_tests.rs") or "tests" in rel.parts[:-1]


def module_of(rel):
    parts = list(rel.with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def crate_graph(src):
    files = {}
    for f in sorted(src.rglob("*.rs")):
        rel = f.relative_to(src)
        if is_test_file(rel) or (rel.name == "main.rs" and (src / "lib.rs").exists()):
            continue
        if rel.parts[0] == "bin":
            continue
        files[module_of(rel)] = (f, strip(f.read_text()))
    modules = set(files)

    def absolute(cur, segs):
        """A path as written in module `cur`, from the crate root; None if external."""
        if not segs:
            return None
        if segs[0] == "crate":
            return list(segs[1:])
        if segs[0] in ("super", "self"):
            base = list(cur)
            while segs and segs[0] in ("super", "self"):
                if segs[0] == "super":
                    base = base[:-1]
                segs = segs[1:]
            return base + list(segs)
        if tuple(cur) + (segs[0],) in modules:
            return list(cur) + list(segs)
        return None

    def resolve(cur, segs):
        """The module a path from module `cur` names, following re-exports; None if external."""
        path = absolute(cur, segs)
        if path is None:
            return None
        for _ in range(8):  # re-export chains are short; stop on a loop
            k = len(path)
            while k > 0 and tuple(path[:k]) not in modules:
                k -= 1
            mod = tuple(path[:k])
            rest = path[k:]
            target = reexports.get(mod, {}).get(rest[0]) if rest else None
            if target is None:
                return mod
            path = target + rest[1:]
        return mod

    # Re-exports first: `pub use a::B` in module m makes m::B mean a::B.
    reexports = {}
    for mod, (_, text) in files.items():
        for m in USE.finditer(text):
            if not m.group(1):
                continue
            for segs in expand(m.group(2)):
                name = segs[-1]
                if name in ("*", "self"):
                    continue
                full = absolute(mod, segs)
                if full:
                    reexports.setdefault(mod, {})[name] = list(full)

    edges = {}
    for mod, (f, text) in files.items():
        found = []
        for m in USE.finditer(text):
            if mod == () and m.group(1):
                continue  # the crate root's re-exports: a facade, not a dependency
            for segs in expand(m.group(2)):
                found.append((segs, text[: m.start()].count("\n") + 1))
        for m in PATH.finditer(text):
            found.append((m.group(0).split("::"), text[: m.start()].count("\n") + 1))
        for segs, line in found:
            target = resolve(mod, segs)
            if target is None or target == mod:
                continue
            edges.setdefault((mod, target), (f, line))
    return modules, edges


def sccs(nodes, adj):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def name(mod):
    return "::".join(mod) or "crate"


def main(dirs):
    found = 0
    for d in dirs:
        src = Path(d)
        modules, edges = crate_graph(src)
        depth = max((len(m) for m in modules), default=0)
        seen = set()
        for level in range(1, depth + 1):
            adj, why = {}, {}
            nodes = {m[:level] for m in modules}
            for (a, b), at in edges.items():
                a, b = a[:level], b[:level]
                if a[: len(b)] != b and b[: len(a)] != a:
                    adj.setdefault(a, set()).add(b)
                    why.setdefault((a, b), at)
            for comp in sccs(nodes, adj):
                key = tuple(comp)
                if key in seen:
                    continue
                seen.add(key)
                found += 1
                print(f"{src}: import circle between " + ", ".join(name(c) for c in comp))
                members = set(comp)
                for (a, b), (f, line) in sorted(why.items()):
                    if a in members and b in members:
                        print(f"    {name(a)} -> {name(b)}  ({f}:{line})")
    if found:
        print(f"{found} import circle(s): move what both sides need into a module below them")
        return 1
    print(f"no import circles in {len(dirs)} crate(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
