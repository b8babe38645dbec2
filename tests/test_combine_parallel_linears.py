"""combine_parallel_linears: q/k/v (and gate/up) as one linear, weights concatenated once at load."""

import numpy as np
import tvm
from tvm import relax

from qwen2c.targets.registry import TARGETS
from qwen2c.targets.tvm.pipelines.combine_parallel_linears import combine_parallel_linears, lift_weight_transforms

H, HEADS, KV, D = 64, 4, 2, 16


def _attention_like(order=(0, 1, 2)):
    """x -> q, k, v linears (bias) -> [1, s, heads, D] each -> concat along heads, as the attention lowering emits."""
    bb = relax.BlockBuilder()
    s = tvm.tirx.Var("s", "int64")
    x = relax.Var("x", relax.TensorType((1, s, H), "float32"))
    ws = [relax.Var(f"w{i}", relax.TensorType((n * D, H), "float32")) for i, n in enumerate((HEADS, KV, KV))]
    bs = [relax.Var(f"b{i}", relax.TensorType((n * D,), "float32")) for i, n in enumerate((HEADS, KV, KV))]
    with bb.function("main", [x, *ws, *bs], attrs={"num_input": 1}):
        with bb.dataflow():
            heads = []
            for w, b, n in zip(ws, bs, (HEADS, KV, KV)):
                y = bb.emit(relax.op.add(bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w)))), b))
                heads.append(bb.emit(relax.op.reshape(y, (1, s, n, D))))
            out = bb.emit_output(bb.emit(relax.op.concat([heads[i] for i in order], axis=2)))
        bb.emit_func_output(out)
    return bb.get()


def _ops(func) -> list[str]:
    found = []
    relax.analysis.post_order_visit(func.body, lambda e: found.append(e.op.name) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    return found


def _rewrite(mod):
    """As the GPU pipeline orders them: linear layers get their NT-matmul kernel before the lift."""
    passes = [*combine_parallel_linears(), relax.transform.FuseTransposeMatmul(), lift_weight_transforms()]
    return tvm.transform.Sequential(passes)(mod)


def test_qkv_become_one_matmul_and_the_split_concat_a_reshape():
    before = _ops(_attention_like()["main"])
    assert before.count("relax.matmul") == 3
    after = _rewrite(_attention_like())
    ops = _ops(after["main"])
    assert ops.count("relax.call_tir") == 1 and "relax.matmul" not in ops  # one NT matmul
    assert "relax.split" not in ops and "relax.concat" not in ops
    # The weights are concatenated (in [out, in] layout, untransposed) once, in transform_params.
    lifted = _ops(after["transform_params"])
    assert "relax.concat" in lifted and "relax.permute_dims" not in lifted


def test_a_concat_of_the_pieces_in_another_order_is_kept():
    after = _rewrite(_attention_like(order=(1, 0, 2)))
    ops = _ops(after["main"])
    assert ops.count("relax.call_tir") == 1 and "relax.concat" in ops and "relax.split" in ops


def test_the_combined_module_computes_the_same_numbers():
    spec = TARGETS.resolve("llvm")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, H), dtype=np.float32)
    ws = [rng.standard_normal((n * D, H), dtype=np.float32) for n in (HEADS, KV, KV)]
    bs = [rng.standard_normal((n * D,), dtype=np.float32) for n in (HEADS, KV, KV)]
    expected = np.concatenate([(x @ w.T + b).reshape(1, 5, -1, D) for w, b in zip(ws, bs)], axis=2)

    mod = _rewrite(_attention_like())
    with spec.tvm_target():
        mod = relax.transform.LegalizeOps()(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target=spec.tvm_target()), tvm.cpu())
    params = vm["transform_params"]([tvm.runtime.tensor(a) for a in (*ws, *bs)])
    got = vm["main"](tvm.runtime.tensor(x), *params).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
