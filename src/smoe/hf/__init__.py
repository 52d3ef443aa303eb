"""transformers interop.

Run a loaded Hugging Face MoE model's sparse blocks on smoe layers::

    import smoe.hf
    smoe.hf.patch(model)     # in place; the layers use the model's own parameters
    smoe.hf.unpatch(model)

Move models between smoe and the Hugging Face format (``smoe export`` / ``smoe import``)::

    smoe.hf.export_hf("runs/demo", "out/hf")     # loads with AutoModelForCausalLM
    smoe.hf.import_hf("out/hf", "runs/imported")

Importing this package does not import transformers; :func:`patch` needs it
(``pip install smoe[hf]``). :data:`SUPPORTED_FAMILIES` lists the ``model_type`` of every family
that can be patched; :mod:`smoe.hf.families` describes each of them.
"""

from smoe.hf.convert import export_hf, hf_format_for, import_hf
from smoe.hf.families import SUPPORTED_FAMILIES
from smoe.hf.patch import is_patched, patch, patched_layers, unpatch

__all__ = ["patch", "unpatch", "is_patched", "patched_layers", "SUPPORTED_FAMILIES",
           "export_hf", "import_hf", "hf_format_for"]
