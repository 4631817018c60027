"""dds_jax: certified robustness by randomized smoothing with data-dependent noise.

Where things happen:
  * noise is drawn in `dds_jax.noise` (keys: seed, purpose, example id, block);
  * the sharded Monte Carlo sampler is `dds_jax.sampler.sample_counts`;
  * counts become a radius in `dds_jax.stats`;
  * CERTIFY / PREDICT are `dds_jax.certify.certify` / `predict`; sequential
    certification at a radius is `certify_at`;
  * dual randomized smoothing (a certified sigma selector) is `dds_jax.dual`.
"""

from dds_jax.certify import Certificate, Decision, certify, certify_at, predict
from dds_jax.errors import (CheckpointError, ConfigError, DataError, DdsError,
                            InputError)
from dds_jax.distributed import make_mesh
from dds_jax.sampler import sample_counts
from dds_jax.stats import (ABSTAIN, binom_pvalue, certificate_from_counts,
                           lower_confidence_bound, prediction_from_counts,
                           radius_from_p_lower)

__version__ = "0.1.0"
