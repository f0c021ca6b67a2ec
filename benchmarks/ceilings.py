"""Measure the two ceilings on the device: copy bandwidth and bf16 matmul rate."""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    n = 1 << 30  # 2 GiB of bf16 per buffer
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    copy_tb_s = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms_mm = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    mm_tflops = 2 * 8192**3 / (ms_mm * 1e-3) / 1e12
    res = {"gpu": torch.cuda.get_device_name(), "copy_tb_s": copy_tb_s, "matmul_bf16_tflops": mm_tflops}
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh)


if __name__ == "__main__":
    main()
