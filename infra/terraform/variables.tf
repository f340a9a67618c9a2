variable "region" {
  description = "AWS region of the buckets and the KMS key (put GPU clusters in the same region)."
  type        = string
  default     = "us-west-2"
}

variable "bucket_name" {
  description = "Name of the store bucket (globally unique). The store URI is s3://<bucket_name>/<store_prefix>."
  type        = string
}

variable "log_bucket_name" {
  description = "Name of the bucket receiving S3 server access logs. Default: <bucket_name>-access-logs."
  type        = string
  default     = null
}

variable "store_prefix" {
  description = "Key prefix of the store inside the bucket (no leading or trailing slash); empty for the bucket root."
  type        = string
  default     = "store"
}

variable "feature_expiration_days" {
  description = "Days after which precomputed feature shards (subjects/*/features/, tagged blockskip-kind=features) expire. They can be recomputed from the plan."
  type        = number
  default     = 30

  validation {
    condition     = var.feature_expiration_days >= 1
    error_message = "feature_expiration_days must be at least 1."
  }
}

variable "feature_tag_key" {
  description = "Object tag key the store writer sets on every object under subjects/{id}/features/ (S3 lifecycle prefixes cannot contain wildcards)."
  type        = string
  default     = "blockskip-kind"
}

variable "feature_tag_value" {
  description = "Object tag value of feature-shard objects."
  type        = string
  default     = "features"
}

variable "noncurrent_version_expiration_days" {
  description = "Days after which noncurrent (overwritten or deleted) object versions are removed."
  type        = number
  default     = 30

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1
    error_message = "noncurrent_version_expiration_days must be at least 1."
  }
}

variable "abort_incomplete_multipart_days" {
  description = "Days after which incomplete multipart uploads are aborted."
  type        = number
  default     = 7
}

variable "access_log_retention_days" {
  description = "Days to keep S3 server access logs."
  type        = number
  default     = 365
}

variable "kms_deletion_window_days" {
  description = "Waiting period before the KMS key is deleted after `terraform destroy` (7-30)."
  type        = number
  default     = 30
}

variable "node_role_name" {
  description = "Name of the IAM role and instance profile of the Ray GPU worker nodes (cluster/aws-gpu.yaml)."
  type        = string
  default     = "blockskip-ray-node"
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}
