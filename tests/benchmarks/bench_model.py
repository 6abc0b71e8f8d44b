"""Prefill tokens/s: our LongcatFlash vs transformers' LongcatFlashForCausalLM, same weights.

Run:  python3 tests/benchmarks/bench_model.py [--repeats 5]
Prefill = one forward over the prompt that fills the KV cache and returns the last
position's logits (transformers: use_cache=True, logits_to_keep=1); a full forward with
every position's logits is printed too. Single intra-op thread, fp32, CPU, both models in
the same run (interleaved, best of --repeats after a warm-up). tokens/s are per second of
the thread's CPU time, which stays steady on a shared machine; wall times are printed too.
Configs: the `small` preset at its default batch, and a
plain 64-expert top-8 MoE (small with zero_expert_num=0, moe_topk=8). Prints absolute tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def _measure(fn) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def bench(name: str, cfg, repeats: int) -> tuple[float, float]:
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    from model import LongcatFlash

    gen = torch.Generator().manual_seed(0)
    ours = LongcatFlash(cfg, generator=gen).eval()
    with torch.no_grad():  # larger weights than the 0.02 init so routing is not uniform noise
        for p in ours.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08, generator=gen)
    ref = LongcatFlashForCausalLM(LongcatFlashConfig(**cfg.to_hf_dict())).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    B, T = cfg.default_batch_size, cfg.default_seq_len
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)

    with torch.inference_mode():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
        scale = ref(ids).logits.abs().max().item()
    tok = B * T
    cases = {  # name: (ours, transformers)
        "prefill": (lambda: ours(ids, cache=ours.new_cache(), logits_to_keep=1),
                    lambda: ref(ids, use_cache=True, logits_to_keep=1)),
        "forward, all logits": (lambda: ours(ids), lambda: ref(ids)),
    }
    results = {}
    for case, (fn_ours, fn_ref) in cases.items():
        with torch.inference_mode():
            fn_ours(), fn_ref()  # warm-up
            best = {"ours": (float("inf"),) * 2, "ref": (float("inf"),) * 2}
            for _ in range(repeats):  # interleaved, so machine noise hits both alike
                for key, fn in (("ours", fn_ours), ("ref", fn_ref)):
                    wall, cpu = _measure(fn)
                    best[key] = (min(best[key][0], wall), min(best[key][1], cpu))
        (w_ours, c_ours), (w_ref, c_ref) = best["ours"], best["ref"]
        print(
            f"{name:<15} {case:<20} B={B} T={T}  ours {tok / c_ours:6.0f} tok/s "
            f"({c_ours * 1e3:6.1f} ms cpu, {w_ours * 1e3:6.1f} ms wall)  transformers {tok / c_ref:6.0f} tok/s "
            f"({c_ref * 1e3:6.1f} ms cpu, {w_ref * 1e3:6.1f} ms wall)  ratio {c_ref / c_ours:4.2f}x cpu, "
            f"{w_ref / w_ours:4.2f}x wall"
        )
        results[case] = (tok / c_ours, tok / c_ref)
    print(f"{name:<15} max|logit diff| {diff:.1e} (logit scale {scale:.2f})")
    t_ours, t_ref = 1 / results["prefill"][0], 1 / results["prefill"][1]
    return results["prefill"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from model import LongcatConfig

    print(f"torch {torch.__version__}, 1 thread, {platform.processor() or platform.machine()}")
    bench("small", LongcatConfig.preset("small"), args.repeats)
    bench("64e-top8", LongcatConfig.preset("small", n_routed_experts=64, zero_expert_num=0, moe_topk=8),
          args.repeats)


if __name__ == "__main__":
    main()
