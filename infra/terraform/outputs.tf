output "bucket_name" {
  description = "Store bucket name."
  value       = aws_s3_bucket.store.bucket
}

output "bucket_arn" {
  description = "Store bucket ARN."
  value       = aws_s3_bucket.store.arn
}

output "store_uri" {
  description = "Value for `--store` (blockskip run / serve)."
  value       = local.store_uri
}

output "kms_key_arn" {
  description = "KMS key encrypting the store bucket."
  value       = aws_kms_key.store.arn
}

output "log_bucket_name" {
  description = "Bucket receiving the store bucket's server access logs."
  value       = aws_s3_bucket.logs.bucket
}

output "store_access_policy_arn" {
  description = "Managed policy with read/write access to the store (bucket + KMS key). Attach it to the Ray head's role."
  value       = aws_iam_policy.store_access.arn
}

output "head_pass_role_policy_arn" {
  description = "Managed policy letting the Ray head (autoscaler) launch workers with the node instance profile."
  value       = aws_iam_policy.head_pass_node_role.arn
}

output "node_instance_profile_arn" {
  description = "Instance profile for Ray worker nodes: IamInstanceProfile.Arn in cluster/aws-gpu.yaml."
  value       = aws_iam_instance_profile.node.arn
}

output "node_role_arn" {
  description = "IAM role of the Ray worker nodes."
  value       = aws_iam_role.node.arn
}
