"""arcflow.pipeline"""
