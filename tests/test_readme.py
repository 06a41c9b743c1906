"""README.md stays runnable: its python snippets run, its `ssl-hybrid` commands parse, its links resolve.

The python snippets run in a temp folder holding what they name (a nano model folder as
``runs/quickstart/model``, a photo, an embeddings folder); the bash blocks are parsed by the real argument
parser (nothing is trained); links are checked against the files of the checkout and the README's headings.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ssl_hybrid.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PHOTO = "photos/cats/Birman_121.jpg"  # the tour's first photo
EMBEDDINGS = "runs/quickstart/embeddings"  # the tour's embeddings folder


def blocks(language: str, text: str | None = None) -> list[tuple[int, str]]:
    """(line number, body) of every fenced block of ``language`` in the README (or in ``text``)."""
    text = README.read_text(encoding="utf-8") if text is None else text
    return [(text[:m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


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


PYTHON_BLOCKS = blocks("python")
BASH_COMMANDS = [(line, argv) for line, body in blocks("bash") for argv in commands(body)]


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
    assert len(PYTHON_BLOCKS) >= 3 and len(BASH_COMMANDS) >= 10


@pytest.mark.parametrize("line,code", PYTHON_BLOCKS, ids=[f"line{line}" for line, _ in PYTHON_BLOCKS])
def test_python_snippet_runs(line, code, snippet_files, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(snippet_files)
    uploads = []

    def upload_folder(repo_id, folder_path, **kwargs):  # no network: check what would be uploaded
        assert (Path(folder_path) / "config.json").is_file(), f"{folder_path} is not a model folder"
        uploads.append(repo_id)

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("line,argv", BASH_COMMANDS, ids=[f"line{line}-{a[0] if a else ''}" for line, a in BASH_COMMANDS])
def test_bash_command_parses(line, argv):
    """Each command names a real subcommand with options it has, in a form its parser accepts."""
    if argv[:1] in (["--help"], ["--version"]) or "--help" in argv:
        return
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"README.md:{line}: `ssl-hybrid {shlex.join(argv)}` does not parse (exit {exit_.code})")
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


def test_relative_links_resolve():
    text = README.read_text(encoding="utf-8")
    outside_code = FENCE.sub("", text)
    anchors = {_slug(h) for h in re.findall(r"^#+ (.*)$", outside_code, re.M)}
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", outside_code):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        if (not (ROOT / path).exists()) if path else (anchor not in anchors):
            broken.append(target)
    assert not broken, f"README.md links to what does not exist: {broken}"
