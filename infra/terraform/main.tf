# Object store of blockskip-ray on AWS S3: the `--store s3://<bucket>/<prefix>` of catalog jobs and Serve.
# Layout inside the store (design.md section 4): models/, subjects/{id}/{plan.parquet,features/,adapter/,...}, jobs/.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  account_id      = data.aws_caller_identity.current.account_id
  partition       = data.aws_partition.current.partition
  log_bucket_name = coalesce(var.log_bucket_name, "${var.bucket_name}-access-logs")
  store_prefix    = trim(var.store_prefix, "/")
  key_prefix      = local.store_prefix == "" ? "" : "${local.store_prefix}/"
  store_uri       = local.store_prefix == "" ? "s3://${var.bucket_name}" : "s3://${var.bucket_name}/${local.store_prefix}"
}

# --------------------------------------------------------------------------------------------------
# KMS key for the store bucket (SSE-KMS with S3 bucket keys), yearly automatic rotation.
# --------------------------------------------------------------------------------------------------
resource "aws_kms_key" "store" {
  description             = "blockskip-ray store bucket ${var.bucket_name}"
  enable_key_rotation     = true
  deletion_window_in_days = var.kms_deletion_window_days

  # The account's IAM policies decide who may use the key (see aws_iam_policy.store_access);
  # Resource "*" in a key policy means "this key".
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "EnableIAMPoliciesInThisAccount"
        Effect    = "Allow"
        Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      }
    ]
  })
}

resource "aws_kms_alias" "store" {
  name          = "alias/${var.bucket_name}"
  target_key_id = aws_kms_key.store.key_id
}

# --------------------------------------------------------------------------------------------------
# Store bucket
# --------------------------------------------------------------------------------------------------
resource "aws_s3_bucket" "store" {
  # checkov:skip=CKV_AWS_144: no cross-region replication: feature shards are recomputable and adapters are reproducible from the catalog; enable replication per deployment if adapters must survive a region loss
  # checkov:skip=CKV2_AWS_62: no event notifications: nothing consumes bucket events; job progress is tracked in jobs/{job_id}/status.parquet
  bucket        = var.bucket_name
  force_destroy = false
}

resource "aws_s3_bucket_ownership_controls" "store" {
  bucket = aws_s3_bucket.store.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "store" {
  bucket                  = aws_s3_bucket.store.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "store" {
  bucket = aws_s3_bucket.store.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "store" {
  bucket = aws_s3_bucket.store.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.store.arn
    }
    # S3 bucket keys: far fewer KMS requests for the many small feature-shard objects.
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "store" {
  bucket = aws_s3_bucket.store.id

  # Feature shards live under {store}/subjects/{subject_id}/features/. Lifecycle prefixes cannot contain
  # wildcards, so the rule matches the subjects/ prefix AND the object tag that the store writer sets on
  # every object it writes under features/ (shards, index.parquet and _COMMITTED alike).
  rule {
    id     = "expire-feature-shards"
    status = "Enabled"
    filter {
      and {
        prefix = "${local.key_prefix}subjects/"
        tags = {
          (var.feature_tag_key) = var.feature_tag_value
        }
      }
    }
    expiration {
      days = var.feature_expiration_days
    }
  }

  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
    expiration {
      expired_object_delete_marker = true
    }
  }

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_days
    }
  }

  depends_on = [aws_s3_bucket_versioning.store]
}

resource "aws_s3_bucket_logging" "store" {
  bucket        = aws_s3_bucket.store.id
  target_bucket = aws_s3_bucket.logs.id
  target_prefix = "s3-access/${var.bucket_name}/"
}

data "aws_iam_policy_document" "store_bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.store.arn, "${aws_s3_bucket.store.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid       = "DenyTLSOlderThan1.2"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.store.arn, "${aws_s3_bucket.store.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }
}

resource "aws_s3_bucket_policy" "store" {
  bucket = aws_s3_bucket.store.id
  policy = data.aws_iam_policy_document.store_bucket.json

  depends_on = [aws_s3_bucket_public_access_block.store]
}

# --------------------------------------------------------------------------------------------------
# Access-log bucket (target of the store bucket's server access logs)
# --------------------------------------------------------------------------------------------------
resource "aws_s3_bucket" "logs" {
  # checkov:skip=CKV_AWS_18: this is the access-log target itself; logging it into itself would loop and logging it elsewhere needs a third bucket
  # checkov:skip=CKV_AWS_145: S3 server access logging only delivers to destinations encrypted with SSE-S3 (AES256), not SSE-KMS
  # checkov:skip=CKV_AWS_144: access logs are audit data kept in-region for their retention period; no replication
  # checkov:skip=CKV2_AWS_62: no event notifications: nothing consumes log-bucket events
  bucket        = local.log_bucket_name
  force_destroy = false
}

resource "aws_s3_bucket_ownership_controls" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "logs" {
  bucket                  = aws_s3_bucket.logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "logs" {
  bucket = aws_s3_bucket.logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id

  rule {
    id     = "expire-access-logs"
    status = "Enabled"
    filter {}
    expiration {
      days = var.access_log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 7
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_days
    }
  }

  depends_on = [aws_s3_bucket_versioning.logs]
}

data "aws_iam_policy_document" "logs_bucket" {
  statement {
    sid       = "AllowS3ServerAccessLogDelivery"
    effect    = "Allow"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.logs.arn}/s3-access/*"]
    principals {
      type        = "Service"
      identifiers = ["logging.s3.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = [aws_s3_bucket.store.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.logs.arn, "${aws_s3_bucket.logs.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "logs" {
  bucket = aws_s3_bucket.logs.id
  policy = data.aws_iam_policy_document.logs_bucket.json

  depends_on = [aws_s3_bucket_public_access_block.logs]
}

# --------------------------------------------------------------------------------------------------
# IAM: read/write access to the store for Ray nodes (no access keys anywhere)
# --------------------------------------------------------------------------------------------------
data "aws_iam_policy_document" "store_access" {
  statement {
    sid       = "ListStoreBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [aws_s3_bucket.store.arn]
  }

  statement {
    sid = "ReadWriteStoreObjects"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:GetObjectTagging",
      "s3:PutObjectTagging",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.store.arn}/*"]
  }

  statement {
    sid       = "UseStoreKey"
    actions   = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
    resources = [aws_kms_key.store.arn]
  }
}

resource "aws_iam_policy" "store_access" {
  name        = "${var.bucket_name}-store-access"
  description = "Read/write access to the blockskip-ray store ${local.store_uri}"
  policy      = data.aws_iam_policy_document.store_access.json
}

data "aws_iam_policy_document" "node_assume_role" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "node" {
  name               = var.node_role_name
  description        = "Ray worker nodes of blockskip-ray (cluster/aws-gpu.yaml)"
  assume_role_policy = data.aws_iam_policy_document.node_assume_role.json
}

resource "aws_iam_role_policy_attachment" "node_store_access" {
  role       = aws_iam_role.node.name
  policy_arn = aws_iam_policy.store_access.arn
}

resource "aws_iam_instance_profile" "node" {
  name = var.node_role_name
  role = aws_iam_role.node.name
}

# The Ray autoscaler on the head launches workers with the node instance profile: it needs PassRole on it.
data "aws_iam_policy_document" "head_pass_node_role" {
  statement {
    sid       = "PassNodeRoleToWorkers"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.node.arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_policy" "head_pass_node_role" {
  name        = "${var.node_role_name}-pass-role"
  description = "Lets the Ray head launch blockskip-ray workers with the ${var.node_role_name} instance profile"
  policy      = data.aws_iam_policy_document.head_pass_node_role.json
}
