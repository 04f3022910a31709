"""What UNet-only machinery a denoiser supports (cxrmem/scoring/denoisers.py `capabilities`), by name.

A detector (cxrmem/detectors.py) or a mitigation strategy (cxrmem/strategies.py) that needs one names it in its
registry row (`needs`); on a denoiser without it, it is skipped with the reason `missing` gives. No torch here:
both registries load without it.
"""

from __future__ import annotations

CROSS_ATTENTION = "cross_attention"
PLAIN_TEXT = "plain_text"
CAPABILITIES = {
    CROSS_ATTENTION: "plain cross-attention layers of a UNet (token attention is read or re-scaled there)",
    PLAIN_TEXT: "a text tensor that is the encoder's hidden states alone (it is perturbed; this layout packs a mask or a pooled row into it)",
}


def missing(needs, capabilities, layout: str) -> str:
    """Why something that `needs` these capabilities cannot run on a denoiser with `capabilities` ("" if it can)."""
    lacking = [CAPABILITIES[name] for name in needs if name not in capabilities]
    return f"needs {'; '.join(lacking)}, which the {layout} layout's denoiser lacks" if lacking else ""
