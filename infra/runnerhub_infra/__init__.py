"""RunnerHub's AWS CDK app: one stack per stage, built from chalicelib's resource definitions."""

import os

# jsii reads this when it starts Node (on the first aws_cdk import). Node 20 synthesizes
# correctly; its end-of-life banner would only bury the synth output in CI logs.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
