"""The layout rules of the repository, checked on the source: who may import whom, and sizes a reader can finish.

- Model files (ckpt, tokenizer, encoders, rae, dit, flow, released, vae, qwen) import only the standard library, torch,
  numpy, safetensors and each other, one way; data.py imports no file of this project; toy.py builds its encoder on
  rae.py; nothing a user runs imports a reference library (transformers, tokenizers, diffusers: bench.py, which
  compares against them, may).
- No non-test file is over 550 lines, no function over 80.
"""
import ast
import glob
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
OURS = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(HERE, "*.py"))}
SOURCES = sorted(m for m in OURS if not m.startswith("test_") and m != "conftest")
RUNTIME = {"torch", "numpy", "PIL", "safetensors", "tqdm"}  # requirements.txt
REFERENCES = {"transformers", "tokenizers", "diffusers"}  # requirements-dev.txt: what bench.py compares against
# what each module may import from this project (scripts, the files not listed, may import any)
ALLOWED = {"ckpt": set(), "tokenizer": set(), "encoders": {"ckpt", "tokenizer"}, "rae": {"ckpt", "encoders"},
           "dit": {"ckpt", "flow", "released"}, "flow": set(), "released": set(), "vae": set(),
           "data": set(), "hub": set(), "training": set(), "toy": {"data", "rae", "tokenizer"},
           "latents": {"ckpt", "data", "rae", "toy"}, "eval": {"ckpt", "data", "rae", "toy"},
           "qwen": {"ckpt", "tokenizer"}}
MODEL_FILES = {"ckpt", "tokenizer", "encoders", "rae", "dit", "flow", "released", "vae", "qwen"}


def imports(module):
    """Top-level names of every module `module` imports, outside its `if __name__ == "__main__":` block."""
    tree = ast.parse(open(os.path.join(HERE, module + ".py")).read())
    main = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.dump(n.test)]
    skip = {id(n) for block in main for n in ast.walk(block)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", SOURCES)
def test_import_rules(module):
    got = imports(module)
    third_party = {n for n in got - OURS if n not in sys.stdlib_module_names}
    allowed = RUNTIME | (REFERENCES if module == "bench" else set())
    assert third_party <= allowed, f"{module}.py imports {sorted(third_party - allowed)}: not a runtime dependency"
    if module in MODEL_FILES:
        assert third_party <= {"torch", "numpy", "safetensors"}, f"model file {module}.py imports {sorted(third_party)}"
    if module in ALLOWED:
        assert got & OURS <= ALLOWED[module], f"{module}.py imports {sorted(got & OURS - ALLOWED[module])}"


def test_model_files_import_one_way():
    """The project's import graph among the modules with rules has no cycle."""
    graph = {m: imports(m) & OURS for m in ALLOWED}
    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and n in graph and reaches(n, b, (*seen, n))) for n in graph[a])
    assert not [m for m in graph if reaches(m, m)]


@pytest.mark.parametrize("module", SOURCES)
def test_sizes(module):
    src = open(os.path.join(HERE, module + ".py")).read()
    assert src.count("\n") <= 550, f"{module}.py has {src.count(chr(10))} lines (guide: a file read in one sitting)"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(src))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"{module}.py: {long}"


def test_the_rules_can_fail(tmp_path, monkeypatch):
    """The checker sees a lazy import inside a function, and ignores one under __main__."""
    (tmp_path / "m.py").write_text("import os\ndef f():\n    import dit\nif __name__ == '__main__':\n    import hub\n")
    monkeypatch.setattr(sys.modules[__name__], "HERE", str(tmp_path))
    assert imports("m") == {"os", "dit"}
