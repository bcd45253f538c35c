"""ldm-deploy: latent diffusion from training to production.

`import ldm_deploy` needs only numpy. Heavy backends (torch, onnxruntime, tensorrt, cuda)
are imported by the modules that use them, when they are used.
"""
__version__ = "0.1.0"

from ldm_deploy.errors import LdmError, UsageError  # noqa: F401
