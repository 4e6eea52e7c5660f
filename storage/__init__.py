"""arcflow.storage"""
