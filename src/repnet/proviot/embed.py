"""Path embeddings: a fixed-size vector per causal path (its paragraph).

Two embedders behind one interface (``fit(paragraphs)``, ``transform(paragraphs) -> (n, dim)``,
``save(folder)`` / ``load``, ``nbytes``):

* :class:`Doc2VecEmbedder` (``doc2vec``): ProvDetector / ProvIoT's choice, a paragraph vector per
  path (PV-DM, gensim's ``Doc2Vec(dm=1)``, 50 dimensions), trained on benign paragraphs; a path
  is embedded by gensim's ``infer_vector`` (re-seeded per path, so the same path always gets the
  same vector). Words the model never saw are ignored by inference, which is its weakness here:
  an attack path made of new labels gets a vector from few known words.
* :class:`HashEmbedder` (``hash``, this project's option): signed feature hashing (the "hashing
  trick") of the paragraph's words, of each node label's last path component, and of every edge
  ``(label, type, label)`` into ``dim`` buckets (BLAKE2b of the feature picks a bucket and a
  sign), L2-normalised. It needs no training and nothing to ship: every device computes the same
  vector for the same path, and a new label or edge lands in buckets of its own instead of being
  dropped. Its bytes in a sync are zero.

Words of a paragraph (:func:`tokens`): node labels and edge types as they are, plus each label's
last component (``/usr/bin/curl`` -> ``curl``), so paths through new files of a known kind share
words with old ones.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path as FsPath

import numpy as np

from repnet.errors import RepnetError

EMBEDDERS = ("hash", "doc2vec")


def tokens(words: list[str]) -> list[str]:
    out = []
    for i, w in enumerate(words):
        out.append(w)
        if i % 2 == 0:  # a node label
            tail = w.rstrip("/").rsplit("/", 1)[-1]
            if tail and tail != w:
                out.append("~" + tail)
    return out


class HashEmbedder:
    kind = "hash"

    def __init__(self, dim: int = 50):
        if dim < 2:
            raise RepnetError(f"embedding dim must be >= 2, got {dim}")
        self.dim = dim
        self._cache: dict[str, tuple[int, float]] = {}

    def fit(self, paragraphs) -> "HashEmbedder":
        return self  # nothing to learn

    def _bucket(self, feature: str) -> tuple[int, float]:
        hit = self._cache.get(feature)
        if hit is None:
            h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
            hit = (h % self.dim, 1.0 if (h >> 32) & 1 else -1.0)
            if len(self._cache) < 200_000:
                self._cache[feature] = hit
        return hit

    def features(self, words: list[str]) -> list[tuple[str, float]]:
        feats = [(f"w:{t}", 0.5) for t in tokens(words)]
        feats += [(f"e:{words[i]}|{words[i + 1]}|{words[i + 2]}", 1.0) for i in range(0, len(words) - 2, 2)]
        return feats

    def transform(self, paragraphs) -> np.ndarray:
        out = np.zeros((len(paragraphs), self.dim), dtype=np.float32)
        for r, words in enumerate(paragraphs):
            for f, w in self.features(list(words)):
                i, s = self._bucket(f)
                out[r, i] += s * w
            n = np.linalg.norm(out[r])
            if n > 0:
                out[r] /= n
        return out

    @property
    def nbytes(self) -> int:
        return 0

    def save(self, folder) -> None:
        from repnet.storage import atomic_write_text

        atomic_write_text(FsPath(folder) / "embedder.json", json.dumps({"kind": "hash", "dim": self.dim}))

    def describe(self) -> dict:
        return {"kind": "hash", "dim": self.dim, "bytes": 0}


class Doc2VecEmbedder:
    kind = "doc2vec"

    def __init__(self, dim: int = 50, epochs: int = 40, window: int = 4, seed: int = 0, infer_epochs: int = 40):
        self.dim, self.epochs, self.window, self.seed, self.infer_epochs = dim, epochs, window, seed, infer_epochs
        self.model = None

    def fit(self, paragraphs) -> "Doc2VecEmbedder":
        try:
            from gensim.models.doc2vec import Doc2Vec, TaggedDocument
        except ImportError:
            raise RepnetError("the doc2vec embedding needs gensim: pip install gensim (scripts/setup.sh installs "
                              "it), or use --embedding hash") from None
        docs = [TaggedDocument(tokens(list(p)), [i]) for i, p in enumerate(paragraphs)]
        if not docs:
            raise RepnetError("the benign set is empty: no path to train the paragraph vectors on")
        self.model = Doc2Vec(docs, dm=1, vector_size=self.dim, window=self.window, min_count=1, epochs=self.epochs,
                             seed=self.seed, workers=1, negative=5, hs=0, sample=0)
        return self

    def transform(self, paragraphs) -> np.ndarray:
        if self.model is None:
            raise RepnetError("doc2vec embedder used before it was trained")
        out = np.zeros((len(paragraphs), self.dim), dtype=np.float32)
        for r, p in enumerate(paragraphs):
            self.model.random = np.random.RandomState(self.seed)  # the same path -> the same vector
            out[r] = self.model.infer_vector(tokens(list(p)), epochs=self.infer_epochs)
        return out

    @property
    def nbytes(self) -> int:
        """What a device must receive to embed as the server does: the word and output vectors."""
        if self.model is None:
            return 0
        wv = self.model.wv.vectors.nbytes
        syn1 = getattr(self.model, "syn1neg", None)
        return int(wv + (syn1.nbytes if syn1 is not None else 0))

    def save(self, folder) -> None:
        """The vectors as safetensors (digest inside), the vocabulary and settings as JSON: no pickle."""
        import torch

        from repnet.storage import atomic_write_text, save_tensors

        m = self.model
        words = list(m.wv.index_to_key)
        save_tensors({"wv": torch.from_numpy(np.ascontiguousarray(m.wv.vectors, dtype=np.float32)),
                      "syn1neg": torch.from_numpy(np.ascontiguousarray(m.syn1neg, dtype=np.float32))},
                     FsPath(folder) / "doc2vec.safetensors")
        atomic_write_text(FsPath(folder) / "embedder.json",
                          json.dumps({"kind": "doc2vec", "dim": self.dim, "seed": self.seed, "window": self.window,
                                      "epochs": self.epochs, "infer_epochs": self.infer_epochs, "words": words,
                                      "counts": [int(m.wv.get_vecattr(w, "count")) for w in words]}))

    @classmethod
    def restore(cls, meta: dict, tensors: dict) -> "Doc2VecEmbedder":
        """The model :meth:`save` wrote, rebuilt: same vocabulary order, vectors and sampling table."""
        from gensim.models.doc2vec import Doc2Vec

        e = cls(int(meta["dim"]), epochs=int(meta["epochs"]), window=int(meta["window"]), seed=int(meta["seed"]),
                infer_epochs=int(meta["infer_epochs"]))
        words, counts = list(meta["words"]), [int(c) for c in meta["counts"]]
        m = Doc2Vec(dm=1, vector_size=e.dim, window=e.window, min_count=1, epochs=e.epochs, seed=e.seed, workers=1,
                    negative=5, hs=0, sample=0)
        m.build_vocab_from_freq(dict(zip(words, counts)))
        perm = [m.wv.key_to_index[w] for w in words]
        for k in list(m.wv.expandos):
            m.wv.expandos[k] = m.wv.expandos[k][perm]
        m.wv.index_to_key = words
        m.wv.key_to_index = {w: i for i, w in enumerate(words)}
        wv, syn1 = tensors["wv"].numpy(), tensors["syn1neg"].numpy()
        if wv.shape != (len(words), e.dim) or syn1.shape != wv.shape:
            raise RepnetError("the doc2vec vectors do not match its vocabulary (damaged model folder)")
        m.wv.vectors = wv.copy()
        m.syn1neg = syn1.copy()
        m.make_cum_table()
        e.model = m
        return e

    def describe(self) -> dict:
        return {"kind": "doc2vec", "dim": self.dim, "bytes": self.nbytes, "epochs": self.epochs}


def make_embedder(kind: str, dim: int = 50, seed: int = 0):
    if kind == "hash":
        return HashEmbedder(dim)
    if kind == "doc2vec":
        return Doc2VecEmbedder(dim, seed=seed)
    raise RepnetError(f"unknown embedding '{kind}'; choose from: {', '.join(EMBEDDERS)}")


def load_embedder(folder):
    folder = FsPath(folder)
    try:
        meta = json.loads((folder / "embedder.json").read_text())
    except (OSError, ValueError, RecursionError):
        raise RepnetError(f"{folder} holds no embedder (embedder.json missing or damaged)") from None
    if not isinstance(meta, dict):
        raise RepnetError(f"{folder}/embedder.json is damaged (not an embedder's description)")
    if meta.get("kind") == "hash":
        dim = meta.get("dim")
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 1 << 16:
            raise RepnetError(f"{folder}/embedder.json is damaged (dim {dim!r}: a whole number in 1 .. 65536)")
        return HashEmbedder(dim)
    if meta.get("kind") == "doc2vec":
        try:
            import gensim  # noqa: F401
        except ImportError:
            raise RepnetError("this model's embedding is doc2vec, which needs gensim: pip install gensim") from None
        from repnet.storage import read_safetensors

        tensors = read_safetensors(folder / "doc2vec.safetensors", "doc2vec vectors", require_digest=True)
        try:
            return Doc2VecEmbedder.restore(meta, tensors)
        except (KeyError, TypeError, ValueError):
            raise RepnetError(f"{folder}/embedder.json is damaged (doc2vec vocabulary / settings)") from None
    raise RepnetError(f"{folder}/embedder.json names an unknown embedding {meta.get('kind')!r}")
