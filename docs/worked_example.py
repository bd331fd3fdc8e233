"""Prints the worked 3x3 example of docs/fapm.md from the real kernel.

    python docs/worked_example.py

tests/test_docs.py checks that the block in docs/fapm.md is exactly this output.
"""

import torch

from fapm_merge.kernel import forgetting_score, kept_count, prune_mask

W_PRE = torch.tensor([[0.50, -0.20, 0.05], [0.10, 0.80, -0.40], [0.30, -0.05, 0.60]])
DW = torch.tensor([[0.02, 0.03, 0.045], [-0.01, 0.04, 0.00], [0.03, 0.01, -0.035]])
SPARSITY = 0.7


def matrix(t: torch.Tensor, fmt: str = "{:+.4f}") -> str:
    return "\n".join("  [" + ", ".join(fmt.format(float(x)) for x in row) + "]" for row in t)


def main() -> None:
    w_ft = W_PRE + DW
    mean = W_PRE.abs().mean().item()
    score = forgetting_score(W_PRE, w_ft)
    fapm = prune_mask(W_PRE, w_ft, SPARSITY)
    magnitude = prune_mask(W_PRE, w_ft, SPARSITY, score="magnitude")
    relative = (w_ft - W_PRE).abs() / W_PRE.abs()
    k = kept_count(9, SPARSITY)
    print(f"mean(|W_pre|) = {mean:.4f};  sparsity = {SPARSITY}, so k = floor(0.3 * 9) = {k}")
    print("|dW| / |W_pre| (relative change):")
    print(matrix(relative))
    print("S = |dW| - mean(|W_pre|) * |dW| / |W_pre|  (dW = 0 scores -inf):")
    print(matrix(score))
    print("kept by FAPM (1) / pruned (0):")
    print(matrix(fapm.int(), "{:.0f}"))
    print("kept by magnitude pruning of dW:")
    print(matrix(magnitude.int(), "{:.0f}"))
    print("output W_pre + dW_kept:")
    print(matrix(torch.where(fapm, w_ft, W_PRE)))


if __name__ == "__main__":
    main()
