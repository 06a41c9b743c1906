"""README.md and docs/*.md stay runnable: their python snippets run, their `ssl-hybrid` commands parse, their
links resolve.

The python snippets run in a temp folder holding what they name (a nano model folder as
``runs/quickstart/model``, a photo, an embeddings folder); the bash blocks are parsed by the real argument
parser (nothing is trained); links are checked against the files of the checkout (relative to the linking file) and the linked file's headings.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ssl_hybrid.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the user documentation: every check runs on each
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PHOTO = "photos/cats/Birman_121.jpg"  # the tour's first photo
EMBEDDINGS = "runs/quickstart/embeddings"  # the tour's embeddings folder


def blocks(language: str, text: str) -> list[tuple[int, str]]:
    """(line number, body) of every fenced block of ``language`` in ``text``."""
    return [(text[:m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def doc_blocks(language: str) -> list[tuple[str, str]]:
    """("file:line", body) of every fenced block of ``language`` in the documentation files."""
    return [(f"{doc.relative_to(ROOT).as_posix()}:{line}", body)
            for doc in DOCS for line, body in blocks(language, doc.read_text(encoding="utf-8"))]


def commands(body: str) -> list[list[str]]:
    """The argument lists of the `ssl-hybrid` (or `-m ssl_hybrid`) commands of a bash block, continuation
    lines joined, comments, environment prefixes and `&&` chains handled."""
    found = []
    for line in body.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|;|\|", line):
            words = shlex.split(part, comments=True)
            for start, word in enumerate(words):
                if word == "ssl-hybrid" or (word == "ssl_hybrid" and words[start - 1:start] == ["-m"]):
                    found.append(words[start + 1:])
                    break
    return found


PYTHON_BLOCKS = doc_blocks("python")
BASH_COMMANDS = [(where, argv) for where, body in doc_blocks("bash") for argv in commands(body)]


@pytest.fixture(scope="module")
def snippet_files(tmp_path_factory) -> Path:
    """A folder with what the snippets name: the quickstart's model folder (a nano model), the tour's photos
    and their embeddings folder."""
    import numpy as np
    import timm
    from PIL import Image

    import ssl_hybrid.models  # noqa: F401  (registers the architectures)
    from ssl_hybrid.eval import embed as emb
    from ssl_hybrid.models.export import save_model_folder

    root = tmp_path_factory.mktemp("readme")
    model = timm.create_model("hybrid_nano", num_classes=0, img_size=32)
    save_model_folder(model, root / "runs/quickstart/model", extra={"image_size": 32, "step": 1})
    rng = np.random.default_rng(0)
    for name in (PHOTO, "photos/dogs/beagle_128.jpg", "photos/dogs/keeshond_130.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / name)
    embedder = emb.load_embedder(str(root / "runs/quickstart/model"), 32, batch_size=4, num_workers=0)
    emb.embed_folder(embedder, str(root / "photos"), root / EMBEDDINGS)
    return root


def test_readme_has_what_this_checks():
    assert len(DOCS) >= 5 and len(PYTHON_BLOCKS) >= 3 and len(BASH_COMMANDS) >= 10
    assert blocks("python", README.read_text(encoding="utf-8")) and any(w.startswith("README.md:") for w, _ in BASH_COMMANDS)


@pytest.mark.parametrize("where,code", PYTHON_BLOCKS, ids=[where for where, _ in PYTHON_BLOCKS])
def test_python_snippet_runs(where, code, snippet_files, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(snippet_files)
    uploads = []

    def upload_folder(repo_id, folder_path, **kwargs):  # no network: check what would be uploaded
        assert (Path(folder_path) / "config.json").is_file(), f"{folder_path} is not a model folder"
        uploads.append(repo_id)

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    exec(compile(code, where, "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("where,argv", BASH_COMMANDS, ids=[f"{w}-{a[0] if a else ''}" for w, a in BASH_COMMANDS])
def test_bash_command_parses(where, argv):
    """Each command names a real subcommand with options it has, in a form its parser accepts."""
    if argv[:1] in (["--help"], ["--version"]) or "--help" in argv:
        return
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{where}: `ssl-hybrid {shlex.join(argv)}` does not parse (exit {exit_.code})")
    assert args.command == argv[0]


def test_a_broken_snippet_or_command_is_caught():
    """The checks above fail on a snippet using an undefined name and on an unknown option."""
    broken = "```python\nimport timm\nembedding = model(image)\n```\n```bash\nssl-hybrid predict m x.jpg --bnak b\n```\n"
    ((_, code),) = blocks("python", broken)
    with pytest.raises(NameError):
        exec(compile(code, "broken", "exec"), {})
    (argv,) = [a for _, body in blocks("bash", broken) for a in commands(body)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    outside_code = FENCE.sub("", doc.read_text(encoding="utf-8"))
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", outside_code, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(ROOT).as_posix() for d in DOCS])
def test_relative_links_resolve(doc):
    """Every relative link names a file of the checkout, and an anchor into a Markdown file one of its headings."""
    outside_code = FENCE.sub("", doc.read_text(encoding="utf-8"))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", outside_code):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to what does not exist: {broken}"


def test_the_readme_stays_user_documentation_sized():
    """Reference material lives in docs/ and benchmark history beside its results: the README stays <= 18 KB."""
    size = len(README.read_bytes())
    assert size <= 18_000, f"README.md is {size} bytes; move reference material to docs/"
