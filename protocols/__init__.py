"""Wire protocol and secure-aggregation protocols of secure-fl.

This package depends only on numpy, grpcio/protobuf, ``cryptography`` and ``tenseal``; it never
imports ``secure_fl``, ``privacy`` or ``robustness`` so that the protocols can be reviewed and
tested on their own.
"""
