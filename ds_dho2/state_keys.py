"""Keys of DHO2's per-shard optimizer state (``optimizer.state[flat_param]``).

Everything DHO2 owns beyond the base optimizer's 1-D moments lives in the nested ``CURVATURE`` dict:
DeepSpeed ZeRO-1/2 stores non-tensor entries of a client optimizer's state verbatim in its checkpoints,
while it would trim 1-D tensors of padding and mangle anything 2-D.
"""

# base optimizer (1-D tensors the size of the flat shard, plus the step counters)
STEP = "step"
APPLIED_STEPS = "applied_steps"
EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
MOMENTUM_BUFFER = "momentum_buffer"

# the curvature tracker's dict (ds_dho2.curvature.tracker)
CURVATURE = "dho2"
REFRESH_COUNT = "refresh_count"
BASIS_VERSION = "basis_version"
EIGENVALUES = "eigenvalues"
EIGENVECTORS = "eigenvectors"
TRANSITION = "transition"
LANCZOS = "lanczos"
LANCZOS_STARTED_AT = "lanczos_started_at"
NEXT_REFRESH = "next_refresh"
INTERVAL = "interval"
LAST_PRODUCTS_STEP = "last_products_step"
HVP_STRATEGY = "hvp_strategy"
WORLD_SIZE = "world_size"
PARTITION_NUMEL = "partition_numel"
TOTAL_NUMEL = "total_numel"

# the optimizer's own entries in that dict
NEWTON_MOMENTUM = "newton_momentum"
NEWTON_BASIS_VERSION = "newton_basis_version"
NONFINITE_STREAK = "nonfinite_streak"
NONFINITE_MAX_STREAK = "nonfinite_max_streak"
SKIPPED_STEPS = "skipped_steps"
ADMM_DUAL = "admm_dual"
ADMM_ANCHOR = "admm_anchor"
ADMM_PENDING = "admm_pending"
ADMM_PENDING_STEPS = "admm_pending_steps"
ADMM_WINDOWS = "admm_windows"
ADMM_ACCEPTED = "admm_accepted"
