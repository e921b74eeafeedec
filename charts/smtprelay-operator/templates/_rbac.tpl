{{/*
The operator's rights in a namespace it serves: exactly the calls it makes, nothing more.
Used by the ClusterRole (rbac.scope=cluster) and by each Role (rbac.scope=namespaced).
Code paths are in operator/smtprelay_operator/ (handlers.py, kube.py) and kopf 1.45.
*/}}
{{- define "smtprelay-operator.namespacedRules" -}}
# kopf watches SmtpRelays (list+watch); each reconcile reads the one it works on (Kube.get in
# reconcile.reconcile and reconcile.write_status). The operator never writes an SmtpRelay
# itself: no kopf annotations, no finalizer (its work queue keeps its state in memory).
- apiGroups: ["smtprelay.dev"]
  resources: ["smtprelays"]
  verbs: ["get", "list", "watch"]
# Kube.replace_status: a merge patch of status.conditions/observedGeneration/configHash.
- apiGroups: ["smtprelay.dev"]
  resources: ["smtprelays/status"]
  verbs: ["patch"]
# The children carry ownerReferences with blockOwnerDeletion: true; clusters running the
# OwnerReferencesPermissionEnforcement admission plugin (e.g. OpenShift) allow that only to
# whoever may update the owner's finalizers. The operator itself never writes them.
- apiGroups: ["smtprelay.dev"]
  resources: ["smtprelays/finalizers"]
  verbs: ["update"]
# Kube.apply server-side-applies each child (PATCH; an apply that creates the object is also
# authorised as create). handlers.child_changed is a kopf watch on them (list+watch) that
# queues their SmtpRelay, whose reconcile puts back what was changed or deleted. The
# operator deletes nothing: the garbage collector removes children through their
# ownerReferences.
- apiGroups: [""]
  resources: ["configmaps", "persistentvolumeclaims", "services"]
  verbs: ["list", "watch", "create", "patch"]
# As above; Kube.get also reads the Deployment to report readiness (reconcile._observer).
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
# events.Recorder posts core v1 Events about an SmtpRelay (Applied, Restored, InvalidConfig,
# ApplyFailed), one per reason and message: a repeat patches its count and lastTimestamp,
# and after an operator restart the existing Event is read (get) to carry its count on.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "get", "patch"]
# The PodMonitor and PrometheusRule an SmtpRelay's spec.monitoring asks for (server-side
# apply, render/monitoring.py). Not watched: drift in them is repaired at each resync.
# get and delete: when a spec change stops asking for one, the operator removes it if the
# SmtpRelay owns it (pruning.py; the owner's uid is checked, and is a delete precondition).
- apiGroups: ["monitoring.coreos.com"]
  resources: ["podmonitors", "prometheusrules"]
  verbs: ["create", "get", "patch", "delete"]
# reconcile._refusal reads the labels of each Secret an SmtpRelay names (Kube.secret_labels),
# to use only those labelled smtprelay.dev/use=true. Only get (no list, no watch: it never
# enumerates Secrets), and asked for as PartialObjectMetadata, so the API server sends the
# metadata and never the data. See the chart README for why this, and not nothing.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}

{{/*
Cluster-scoped rights, only with rbac.scope=cluster. The operator runs --standalone
(main.py), so kopf's peering needs nothing.
*/}}
{{- define "smtprelay-operator.clusterRules" -}}
# kopf lists the CRDs at start-up and then watches them (its resource observer), so it
# notices the SmtpRelay CRD being installed or upgraded. Cluster-scoped: ClusterRole only.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.watchNamespaces }}
# Only when limited to watchNamespaces: kopf then lists and watches namespaces (its namespace
# observer) to follow the listed ones coming and going. Cluster-wide it does not.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
