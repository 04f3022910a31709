"""Copy detection on the testbed, and the costs of indexing and searching at MIMIC-CXR's scale.

    python bench/copies.py testbed [--controls 100 --generations 4 --threads 2]
    python bench/copies.py embed [--threads 1]
    python bench/copies.py search [--n-index 377000 --n-queries 1000 --dim 768]

`testbed`: exports the committed testbed's training images (its phantoms) as PNG, reads them
back, embeds them with the `pixel` embedder and decodes N generations of every planted prompt
and of `--controls` never-duplicated prompts (n_copies == 1) at w = 7.5 and at w = 1. Per prompt
the max similarity of its generations to their nearest training image gives the AUC of planted
vs controls; the copy threshold is calibrated on half of the controls (seeded) and precision /
recall of "copy" are taken on the planted prompts and the other half; "own image" is the share
of planted prompts whose best generation's nearest image is their own training image.

`embed`: index throughput (images/s) on the CPU for `pixel` (1024 x 1024 arrays, and reading a
2048 x 2048 JPG as well) and for a rad_dino-sized model (random weights, DINOv2-base shapes, the
published preprocessor) at 518 px (rad-dino's own input) and 224 px.

`search`: 1K generation embeddings against 377K stored random unit vectors (dim 768), exact
chunked search with torch (float32, float16, bfloat16), faiss exact (IndexFlatIP) and ANN
(IndexIVFFlat, usearch HNSW) where installed; each case in a fresh process, so that its peak RSS
is its own. Half the queries are noisy copies of stored rows (cosine ~0.9): "copy recall" is the
share of those whose top-1 is the copied row; "recall@10" is the overlap with the float32 top 10.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for cxrmem and bench.rad_dino_replica

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from cxrmem.results_page import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the testbed ------------------------------------------------------------------------------
def testbed_prompts(manifest, n_controls: int, seed: int):
    """Every planted prompt, and a seeded sample of never-duplicated ones split in calibration / evaluation halves."""
    controls = manifest[(manifest.n_copies == 1) & ~manifest.planted].sample(n=n_controls, random_state=seed)
    frame = pd.concat([manifest[manifest.planted], controls])
    calibration = np.zeros(len(frame), dtype=bool)
    calibration[int(manifest.planted.sum()) :: 2] = True  # every other control
    return frame.assign(group=np.where(frame.planted, "memorized", "control"), calibration=calibration)


def testbed_guidance(scorer, frame, index, table, embedder, guidance: float, args) -> dict:
    from cxrmem.copies.evidence import calibrate_threshold, copies_table
    from cxrmem.copies.find import nearest_images
    from cxrmem.copies.generation import generate
    from cxrmem.copies.settings import CopiesSettings
    from cxrmem.stats import roc_auc

    started = time.perf_counter()
    settings = CopiesSettings(generations=args.generations, batch_size=args.batch_size)
    images = generate(scorer, frame.prompt.tolist(), frame.prompt_id.tolist(), args.generations, guidance, args.batch_size)
    sims, rows = nearest_images(embedder, images, index, settings)
    planted, calibration = frame.planted.to_numpy(), frame.calibration.to_numpy()
    best = sims[:, :, 0].max(axis=1)
    threshold = calibrate_threshold(best[~planted & calibration])
    evaluated = planted | ~calibration
    prompts = frame[evaluated].assign(source_ids=[[pid] for pid in frame.prompt_id[evaluated]])
    table_out = copies_table(prompts, sims[evaluated], rows[evaluated], table, threshold, guidance, embedder.fingerprint)
    result = table_out.to_pandas()
    is_planted = result.group.to_numpy() == "memorized"
    flagged = result.is_copy.to_numpy()
    tp = int((flagged & is_planted).sum())
    return {
        "guidance": guidance,
        "auc": roc_auc(best[planted], best[~planted]),
        "threshold": threshold.summary(),
        "precision": tp / max(int(flagged.sum()), 1),
        "recall": tp / int(is_planted.sum()),
        "false_positives": int((flagged & ~is_planted).sum()),
        "own_image_planted": float(result.same_study[is_planted].mean()),
        "own_image_controls": float(result.same_study[~is_planted].mean()),
        "max_similarity_planted_mean": float(best[planted].mean()),
        "max_similarity_controls_mean": float(best[~planted].mean()),
        "copy_share_planted_mean": float(result.copy_share[is_planted].mean()),
        "seconds": round(time.perf_counter() - started, 1),
    }


def run_testbed(args) -> dict:
    from omegaconf import OmegaConf

    from cxrmem.config import load_config
    from cxrmem.copies.embedders import EmbedderSettings, make_embedder
    from cxrmem.copies.images import read_image
    from cxrmem.corpus.text import prompt_id
    from cxrmem.models.loading import load_components
    from cxrmem.scoring.scorer import Scorer
    from cxrmem.testbed.dataset import MANIFEST
    from cxrmem.testbed.export import export_training_images

    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "conf" / "testbed.yaml", [f"testbed.out={ROOT / 'testbed' / 'model'}"])
    tb = cfg.testbed
    embedder = make_embedder(EmbedderSettings(name="pixel", size=tb.image_size))
    with tempfile.TemporaryDirectory() as folder:
        table = export_training_images(tb.out, folder, cfg.corpus)
        index = embedder([read_image(Path(p).read_bytes(), p) for p in table.path])
    manifest = pd.read_csv(os.path.join(tb.out, MANIFEST))
    frame = testbed_prompts(manifest, args.controls, tb.seed).assign(prompt_id=lambda f: [prompt_id(p) for p in f.prompt])
    score_cfg = OmegaConf.merge(cfg.score, {"steps": tb.eval_steps, "screening_steps": None})
    components = load_components(OmegaConf.merge(cfg.model, {"path": tb.out}), cfg.storage)
    scorer = Scorer(components, score_cfg, device="cpu")
    return {
        "n_index": len(table),
        "n_planted": int(frame.planted.sum()),
        "n_controls": int((~frame.planted).sum()),
        "generations": args.generations,
        "steps": tb.eval_steps,
        "threads": args.threads,
        "guidances": [testbed_guidance(scorer, frame, index, table, embedder, w, args) for w in (7.5, 1.0)],
    }


# -- index throughput -------------------------------------------------------------------------
def throughput(embed, images, rounds: int = 1) -> dict:
    """Images per wall second and per CPU second (the fair measure on a shared machine)."""
    embed(images[:1])  # warm-up
    started, started_cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        embed(images)
    n = rounds * len(images)
    return {"per_s": round(n / (time.perf_counter() - started), 2), "per_cpu_s": round(n / (time.process_time() - started_cpu), 2)}


def run_embed(args) -> dict:
    from PIL import Image

    from bench.rad_dino_replica import BASE, build_rad_dino_replica
    from cxrmem.copies.embedders import EmbedderSettings, make_embedder
    from cxrmem.copies.images import read_image

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    arrays = [rng.random((1024, 1024), dtype=np.float32) for _ in range(32)]
    pixel = make_embedder(EmbedderSettings(name="pixel", size=64))
    result = {"threads": args.threads, "pixel_1024px_arrays": throughput(pixel, arrays, rounds=3)}
    with tempfile.TemporaryDirectory() as folder:
        jpg = os.path.join(folder, "cxr.jpg")
        Image.fromarray((rng.random((2048, 2048)) * 255).astype(np.uint8)).save(jpg, quality=95)
        data = Path(jpg).read_bytes()
        result["pixel_read_2048px_jpg"] = throughput(lambda xs: pixel([read_image(data, jpg) for _ in xs]), arrays[:16])
        for crop, n in ((518, args.vit_images), (224, 2 * args.vit_images)):
            cache = os.path.join(folder, f"hub{crop}")
            build_rad_dino_replica(cache, BASE, crop=crop)
            vit = make_embedder(EmbedderSettings(name="rad_dino", cache_dir=cache, batch_size=n))
            result[f"rad_dino_base_{crop}px"] = throughput(vit, arrays[:n])
    return result


# -- search -----------------------------------------------------------------------------------
def random_index(n: int, dim: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """n random unit rows, built in chunks so that the float32 transient stays small."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.empty(n, dim, dtype=dtype)
    for start in range(0, n, 32768):
        rows = torch.randn(min(32768, n - start), dim, generator=generator)
        index[start : start + len(rows)] = torch.nn.functional.normalize(rows, dim=1).to(dtype)
    return index


def search_queries(index: torch.Tensor, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """n unit queries: the first half noisy copies of random index rows (cosine ~0.9), the rest random."""
    generator = torch.Generator().manual_seed(seed)
    copied = torch.randint(0, index.shape[0], (n // 2,), generator=generator)
    noise = torch.randn(n, index.shape[1], generator=generator)
    queries = torch.nn.functional.normalize(noise, dim=1)
    queries[: n // 2] = torch.nn.functional.normalize(index[copied].float() + 0.5 * queries[: n // 2], dim=1)
    return queries, copied


def search_case(engine: str, args) -> dict:
    from cxrmem.copies.search import top_k

    torch.set_num_threads(args.threads)
    dtype = {"torch-float32": torch.float32, "torch-float16": torch.float16, "torch-bfloat16": torch.bfloat16}.get(engine, torch.float32)
    index = random_index(args.n_index, args.dim, dtype)
    queries, copied = search_queries(index, args.n_queries)
    built_mb = psutil.Process().memory_info().rss / 2**20
    build = (0.0, 0.0)
    started, started_cpu = time.perf_counter(), time.process_time()
    if engine.startswith("torch"):
        _, rows = top_k(queries, index, k=10, dtype=dtype, query_chunk=1024, index_chunk=32768)
        rows = rows.numpy()
    elif engine.startswith("faiss"):
        rows, build = faiss_search(engine, index.numpy(), queries.numpy(), args)
    else:
        rows, build = usearch_search(index.numpy(), queries.numpy(), args)
    half = args.n_queries // 2
    return {
        "engine": engine,
        "search_s": round(time.perf_counter() - started - build[0], 2),
        "search_cpu_s": round(time.process_time() - started_cpu - build[1], 2),
        "build_s": round(build[0], 1),
        "build_cpu_s": round(build[1], 1),
        "index_mb": round(index.element_size() * index.numel() / 2**20),
        "rss_after_index_mb": round(built_mb),  # current RSS: imports + the stored index
        "peak_rss_mb": round(peak_rss_mb()),
        "copy_recall": float((rows[:half, 0] == copied.numpy()).mean()),
        "rows": rows.tolist(),
    }


def faiss_search(engine: str, index: np.ndarray, queries: np.ndarray, args) -> tuple[np.ndarray, tuple[float, float]]:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    started, started_cpu = time.perf_counter(), time.process_time()
    if engine == "faiss-flat":
        store = faiss.IndexFlatIP(index.shape[1])
    else:  # IVF: 1024 lists trained on a 64K sample, 32 probed
        store = faiss.IndexIVFFlat(faiss.IndexFlatIP(index.shape[1]), index.shape[1], 1024, faiss.METRIC_INNER_PRODUCT)
        store.train(index[:65536])
        store.nprobe = 32
    store.add(index)
    build = (time.perf_counter() - started, time.process_time() - started_cpu)
    _, rows = store.search(queries, 10)
    return rows, build


def usearch_search(index: np.ndarray, queries: np.ndarray, args) -> tuple[np.ndarray, tuple[float, float]]:
    from usearch.index import Index

    started, started_cpu = time.perf_counter(), time.process_time()
    store = Index(ndim=index.shape[1], metric="ip", dtype="f16")
    store.add(np.arange(len(index)), index, threads=args.threads)
    build = (time.perf_counter() - started, time.process_time() - started_cpu)
    matches = store.search(queries, 10, threads=args.threads)
    return np.asarray(matches.keys), build


def run_search(args) -> dict:
    cases = {}
    for engine in args.engines.split(","):
        command = [sys.executable, __file__, "search-case", "--engine", engine, *search_flags(args)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            cases[engine] = {"engine": engine, "error": done.stderr.strip().splitlines()[-1:]}
            continue
        cases[engine] = json.loads(done.stdout.strip().splitlines()[-1])
    exact = np.asarray(cases["torch-float32"]["rows"]) if "rows" in cases.get("torch-float32", {}) else None
    for case in cases.values():
        rows = case.pop("rows", None)
        if exact is not None and rows is not None:
            rows = np.asarray(rows)
            case["recall_at_10"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)]))
    return {"n_index": args.n_index, "n_queries": args.n_queries, "dim": args.dim, "threads": args.threads, "cases": list(cases.values())}


def search_flags(args) -> list[str]:
    return ["--n-index", str(args.n_index), "--n-queries", str(args.n_queries), "--dim", str(args.dim), "--threads", str(args.threads)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["testbed", "embed", "search", "search-case"])
    parser.add_argument("--controls", type=int, default=100)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vit-images", type=int, default=4)
    parser.add_argument("--n-index", type=int, default=377_000)
    parser.add_argument("--n-queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--engines", default="torch-float32,torch-float16,torch-bfloat16,faiss-flat,faiss-ivf,usearch-hnsw")
    parser.add_argument("--engine", default="torch-float32")
    args = parser.parse_args()
    if args.what == "search-case":
        print(json.dumps(search_case(args.engine, args)))
        return
    result = {"testbed": run_testbed, "embed": run_embed, "search": run_search}[args.what](args)
    result["cpu"] = cpu_name()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
