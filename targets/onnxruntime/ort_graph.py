"""Rewrite the exported ONNX for ONNX Runtime's fused kernels, with onnxscript's rewriter.

ONNX Runtime fuses a residual add with the RMSNorm after it into ``SkipSimplifiedLayerNormalization``
(one pass over the hidden state instead of two). onnxscript already has that fusion
(``ort_fusions.skip_normalization``), written against ONNX Runtime's ``SimplifiedLayerNormalization``;
the export uses the standard opset-23 ``RMSNormalization`` (what other runtimes read), so the first
rule here renames one into the other (same maths: float32 sums with ``stash_type=1``, scale by the
weight), and onnxscript's fusion does the rest. The norms that found no residual add to fuse with
(the first layer's) go back to ``RMSNormalization``: ONNX Runtime's ``SimplifiedLayerNormalization``
sits in the default ONNX domain without an ONNX schema, which ``onnx.checker`` rejects, and
ONNX Runtime runs ``RMSNormalization`` itself.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization


class RmsNormToSimplifiedLayerNorm(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, scale):
        return op.RMSNormalization(x, scale, _allow_other_attributes=True, _outputs=["normalized"])

    def check(self, context, x, scale, normalized, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        attrs = normalized.producer().attributes
        if attrs.get_int("axis", -1) != -1:
            return result.fail("RMSNormalization over an axis other than the last", normalized)
        if attrs.get_int("stash_type", 1) != 1:
            return result.fail("RMSNormalization that does not compute in float32", normalized)
        return result

    def rewrite(self, op, x, scale, normalized, **_):
        epsilon = normalized.producer().attributes.get_float("epsilon", 1e-5)
        # ONNX Runtime registers SimplifiedLayerNormalization in the default domain (onnxscript's note).
        return op.SimplifiedLayerNormalization(x, scale, axis=-1, epsilon=epsilon, stash_type=1)


class SimplifiedLayerNormToRmsNorm(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, scale):
        return op.SimplifiedLayerNormalization(x, scale, _allow_other_attributes=True, _outputs=["normalized"])

    def rewrite(self, op, x, scale, normalized, **_):
        epsilon = normalized.producer().attributes.get_float("epsilon", 1e-5)
        return op.RMSNormalization(x, scale, axis=-1, epsilon=epsilon, stash_type=1)


_to_simplified = pattern.RewriteRuleSet([RmsNormToSimplifiedLayerNorm.rule()])
_back_to_rms_norm = pattern.RewriteRuleSet([SimplifiedLayerNormToRmsNorm.rule()])


def optimize_for_ort(model: ir.Model) -> dict[str, int]:
    """Rewrite ``model`` in place; return how often each rewrite fired."""
    renamed = _to_simplified.apply_to_model(model)
    fused = fuse_skip_rms_normalization(model)
    _back_to_rms_norm.apply_to_model(model)
    return {"rms_norm_to_simplified_layer_norm": renamed, "skip_simplified_layer_norm": fused}
