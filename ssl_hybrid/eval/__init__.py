"""Few-label evaluation of frozen or fine-tuned backbones.

backbones.py (the one loader: run dir, .safetensors, timm:/random:) -> features.py (cached, multi-process
extraction) -> knn.py (FAISS, DINO protocol) / linear.py (logistic probe) / fewshot.py (seeded k-shot) /
finetune.py (layer-wise lr decay) -> report.py (table, plots); commands.py backs the CLI (the k-NN
benchmark is benchmarks/bench_eval.py).
"""
