"""m2rl.envs.swe: the SWE-bench environment `m2rl/SWE-v0` (instances, images, grading) and its task factory.

Importing it registers the env id only; the env's module (and swebench) load when an env is made.
"""

from m2rl.envs.registration import register_env

register_env("m2rl/SWE-v0", "m2rl.envs.swe.env:make_swe_env")
