"""Interoperability: convert checkpoints to and from torch.save, flat safetensors and DCP.

::

    from ckptproto.interop import convert
    convert("model.pt", "checkpoints/model", to="ckptproto")
"""

from ckptproto.interop.convert import FORMATS, ConversionResult, Format, convert, detect_format

__all__ = ["FORMATS", "ConversionResult", "Format", "convert", "detect_format"]
