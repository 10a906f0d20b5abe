# Source this on a GPU machine of the device tool, from the repo root: makes `import m2rl` work from the
# bare checkout (no pip install there) and installs the carried wheels (.whl/, see docs/gpu.md).
#   source scripts/device_env.sh && python3 -m pytest -m gpu tests/model
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/m2rl
export PYTHONPATH="/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
