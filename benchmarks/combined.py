"""One table of every model on a dataset, beside the papers' ML-1M rows, from the committed grids.

Reads ``<dataset>_{ranking,ctr,retrieval}.json`` (written by benchmarks/ranking.py) and
``<dataset>_unigrf.json`` (benchmarks/unigrf.py: one line per variant, ``unigrf/<variant>``) under
benchmarks/results and writes ``<dataset>_combined.{json,md}``. Paper figures are quoted from
papers/003 (UniGRF, Tables 2-3, ML-1M, leave-one-out) for orderings only: the data differ.

    python benchmarks/combined.py [--dataset ml-latest-small]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import report

ROOT = Path(__file__).resolve().parent.parent
PAPER_ML1M = {  # UniGRF paper, ML-1M: Table 3 (AUC), Table 2 (HR@10, NDCG@10)
    "din": {"auc": 0.7329}, "dcnv2": {"auc": 0.7176}, "gdcn": {"auc": 0.7364}, "hstu": {"auc": 0.7621,
    "hr@10": 0.3132, "ndcg@10": 0.1708}, "sasrec": {"hr@10": 0.2899, "ndcg@10": 0.1594},
    "gru4rec": {"hr@10": 0.1816, "ndcg@10": 0.1015}, "narm": {"hr@10": 0.2445, "ndcg@10": 0.1350},
    "bprmf": {"hr@10": 0.1185, "ndcg@10": 0.0607},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="ml-latest-small")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    rows, sources = [], []
    for name in ("ranking", "ctr", "retrieval", "unigrf"):
        path = Path(args.results) / f"{args.dataset}_{name}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            rows += [r | {"model": f"{r['model']}/{r['variant']}"} if "variant" in r else r for r in data["rows"]]
            sources.append(f"{path.name} ({data['meta']['device']})")
    if not rows:
        raise SystemExit(f"no result files for {args.dataset} under {args.results}")
    ranking = [r for r in rows if r.get("auc") is not None]  # every model with a ranking head
    retrieval = [r for r in rows if r.get("hr@10") is not None]
    rank_summary = report.summary(ranking, ["model", "protocol"], ["auc", "gauc", "logloss"])
    rank_summary.sort(key=lambda r: (r["protocol"], -r["auc"]))
    retr_summary = report.summary(retrieval, ["model", "protocol"], ["hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr",
                                                                      "hr@10/request", "ndcg@10/request"])
    retr_summary.sort(key=lambda r: -r["ndcg@10"])
    for r in rank_summary + retr_summary:
        for k, v in PAPER_ML1M.get(r["model"], {}).items():
            r[f"paper_ml1m_{k}"] = v
    md = (f"Sources: {', '.join(sources)}. Mean ± std over seeds. `paper_ml1m_*`: the UniGRF paper's ML-1M "
          "figures (leave-one-out), for orderings only.\n\n### Ranking (CTR: label = rating > 3)\n\n"
          + report.markdown_table(rank_summary, ["model", "protocol", "runs", "auc", "gauc", "logloss",
                                                  "paper_ml1m_auc"], std=True)
          + "\n### Retrieval (next item, full catalogue, leave-one-out)\n\n"
          + report.markdown_table(retr_summary, ["model", "protocol", "runs", "hr@10", "ndcg@10", "hr@50", "mrr",
                                                  "hr@10/request", "ndcg@10/request", "paper_ml1m_hr@10",
                                                  "paper_ml1m_ndcg@10"], std=True))
    meta = report.meta(["python", "benchmarks/combined.py", *(argv if argv is not None else sys.argv[1:])],
                        device="; ".join(sources))
    report.write(Path(args.results) / f"{args.dataset}_combined", rank_summary + retr_summary, md, meta)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
