"""arcflow.distill"""
