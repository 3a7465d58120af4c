"""diffusers pipelines of latentflow."""

from pipelines.pipeline_latentflow import LatentFlowPipeline, LatentFlowPipelineOutput, LatentFlowScheduler

__all__ = ["LatentFlowPipeline", "LatentFlowPipelineOutput", "LatentFlowScheduler"]
