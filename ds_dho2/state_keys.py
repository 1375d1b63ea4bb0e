"""Keys of DHO2's per-shard optimizer state (``optimizer.state[flat_param]``).

Everything DHO2 owns beyond the base optimizer's 1-D moments lives in the nested ``CURVATURE`` dict:
DeepSpeed ZeRO-1/2 stores non-tensor entries of a client optimizer's state verbatim in its checkpoints,
while it would trim 1-D tensors of padding and mangle anything 2-D.
"""

STEP = "step"
EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
MOMENTUM_BUFFER = "momentum_buffer"

CURVATURE = "dho2"
REFRESH_COUNT = "refresh_count"
EIGENVALUES = "eigenvalues"
EIGENVECTORS = "eigenvectors"
NEWTON_MOMENTUM = "newton_momentum"
LANCZOS = "lanczos"
LANCZOS_STARTED_AT = "lanczos_started_at"
ADMM_DUAL = "admm_dual"
ADMM_ANCHOR = "admm_anchor"
WORLD_SIZE = "world_size"
PARTITION_NUMEL = "partition_numel"
TOTAL_NUMEL = "total_numel"
