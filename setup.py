"""Build of the native codec core; everything else is in pyproject.toml.

The extension is optional: where no C compiler is found, setuptools skips it
and mzstore runs on its numpy codecs (mzstore/codecs/native.py warns once).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mzstore.codecs._native",
            sources=["mzstore/codecs/_native.c"],
            # -ffp-contract=off: no fused multiply-add, so x*s rounds as numpy's f32 multiply does
            extra_compile_args=["-O3", "-fno-wrapv", "-ffp-contract=off", "-fno-strict-aliasing"],
            optional=True,
        )
    ]
)
