"""Imported once by the memory probe's fork server (slimbench.sweep.memory_probe), never elsewhere:
what a probe child would otherwise import on its own (the registry's methods and tasks, the model
loaders, transformers' model machinery and its commonest architecture), so that each child,
forked from the server, mostly loads and measures its model. Under load, those imports took a
child 25 to 40 s; warm, loading a small model takes about a second."""

import transformers.generation.utils
import transformers.modeling_utils
import transformers.models.llama.modeling_llama  # noqa: F401 - Llama-shaped models are the commonest here

from slimbench.measure.clocks import freeze_imports
from slimbench.sweep import cellrun  # noqa: F401 - loaders, the method API, the artifact cache

# The registries' discovery imports every method and task module; then all is frozen, and the
# children inherit it: their collections skip the server's imports.
freeze_imports()
