"""diffusers pipelines of latentflow.

Installed as `latentflow.pipelines` (no top-level `pipelines` package is installed, which would collide with other
projects' folders of that name); in a source checkout `from pipelines import LatentFlowPipeline` works as well.
"""

from .pipeline_latentflow import LatentFlowPipeline, LatentFlowPipelineOutput, LatentFlowScheduler

__all__ = ["LatentFlowPipeline", "LatentFlowPipelineOutput", "LatentFlowScheduler"]
