"""Optional glue between lowcomm and other libraries. Each submodule needs its
own extra: `lowcomm.integrations.transformers` (the Hugging Face `Trainer`)
needs ``pip install 'lowcomm[hf]'``."""
