//! The Kubernetes objects the watcher reads, as JSON shapes with only the fields used
//! (pods and Services, LIST pages, WATCH events, `metav1.Status`), and what an object
//! means as an engine: `pod-ip`: a pod is an engine while it is `Running`, ready (its
//! `Ready` condition, or every container ready when it has no conditions), has a pod IP
//! and is not being deleted (`deletionTimestamp`); `service-name`: every Service not being
//! deleted is an engine at `http://NAME.NAMESPACE.svc:PORT`.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::{K8sDiscoveryType, K8sSettings};

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Meta {
    pub name: String,
    pub resource_version: Option<String>,
    pub deletion_timestamp: Option<String>,
    /// Only the `model` label is read (`disaggregated_prefill` sorts engines by it).
    pub labels: Labels,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Labels {
    pub model: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ContainerStatus {
    pub ready: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Status {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    pub conditions: Option<Vec<Condition>>,
    pub container_statuses: Option<Vec<ContainerStatus>>,
}

/// A pod or a Service.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Object {
    pub metadata: Meta,
    pub status: Option<Status>,
}

/// A LIST page's metadata: its resourceVersion, and where the next page starts.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ListMeta {
    pub resource_version: Option<String>,
    #[serde(rename = "continue")]
    pub continue_token: Option<String>,
}

/// One LIST page.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct List {
    pub metadata: ListMeta,
    pub items: Vec<Object>,
}

/// A `metav1.Status` (the object of an `ERROR` event, or an error response's body).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ApiStatus {
    pub code: u16,
    pub reason: String,
    pub message: String,
}

/// One line of a WATCH stream; the object is parsed once its type is known.
#[derive(Deserialize)]
pub struct WatchEvent<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    #[serde(borrow)]
    pub object: &'a RawValue,
}

/// Whether a pod serves: `Running`, ready, with an IP, not being deleted.
pub fn pod_ready(obj: &Object) -> bool {
    let Some(st) = &obj.status else { return false };
    if obj.metadata.deletion_timestamp.is_some()
        || st.phase.as_deref() != Some("Running")
        || st.pod_ip.as_deref().is_none_or(str::is_empty)
    {
        return false;
    }
    match st
        .conditions
        .as_deref()
        .and_then(|c| c.iter().find(|c| c.kind == "Ready"))
    {
        Some(c) => c.status == "True",
        None => st
            .container_statuses
            .as_deref()
            .is_some_and(|c| !c.is_empty() && c.iter().all(|s| s.ready)),
    }
}

/// The engine URL `obj` stands for now, or None when it is not an engine.
pub fn engine_url(obj: &Object, k: &K8sSettings) -> Option<String> {
    if obj.metadata.name.is_empty() || obj.metadata.deletion_timestamp.is_some() {
        return None;
    }
    match k.kind {
        K8sDiscoveryType::ServiceName => Some(format!(
            "http://{}.{}.svc:{}",
            obj.metadata.name, k.namespace, k.port
        )),
        K8sDiscoveryType::PodIp => {
            if !pod_ready(obj) {
                return None;
            }
            let ip = obj.status.as_ref()?.pod_ip.as_deref()?;
            Some(if ip.contains(':') {
                format!("http://[{ip}]:{}", k.port)
            } else {
                format!("http://{ip}:{}", k.port)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(kind: K8sDiscoveryType) -> K8sSettings {
        K8sSettings {
            namespace: "ns".into(),
            label_selector: "app=vllm".into(),
            port: 8000,
            kind,
            watcher_timeout_seconds: 0,
        }
    }

    fn pod(json: serde_json::Value) -> Object {
        serde_json::from_value(json).expect("pod")
    }

    #[test]
    fn a_pod_is_an_engine_only_when_running_ready_addressed_and_not_deleted() {
        let k = settings(K8sDiscoveryType::PodIp);
        let ready = serde_json::json!({
            "metadata": {"name": "p", "resourceVersion": "7", "labels": {"model": "x"}},
            "spec": {"containers": [{"name": "vllm"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5",
                "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "vllm", "ready": true}]}
        });
        assert_eq!(
            engine_url(&pod(ready.clone()), &k).as_deref(),
            Some("http://10.0.0.5:8000")
        );
        // Its `model` label sorts it under disaggregated_prefill.
        assert_eq!(
            pod(ready.clone()).metadata.labels.model.as_deref(),
            Some("x")
        );
        let mut unready = ready.clone();
        unready["status"]["conditions"][1]["status"] = "False".into();
        assert_eq!(engine_url(&pod(unready), &k), None);
        let mut terminating = ready.clone();
        terminating["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z".into();
        assert_eq!(engine_url(&pod(terminating), &k), None);
        let mut pending = ready.clone();
        pending["status"]["phase"] = "Pending".into();
        assert_eq!(engine_url(&pod(pending), &k), None);
        let mut no_ip = ready.clone();
        no_ip["status"]
            .as_object_mut()
            .expect("status")
            .remove("podIP");
        assert_eq!(engine_url(&pod(no_ip), &k), None);
        // Without conditions, every container must be ready.
        let mut by_containers = ready.clone();
        by_containers["status"]
            .as_object_mut()
            .expect("status")
            .remove("conditions");
        assert!(engine_url(&pod(by_containers.clone()), &k).is_some());
        by_containers["status"]["containerStatuses"] =
            serde_json::json!([{"ready": true}, {"ready": false}]);
        assert_eq!(engine_url(&pod(by_containers.clone()), &k), None);
        by_containers["status"]["containerStatuses"] = serde_json::json!([]);
        assert_eq!(engine_url(&pod(by_containers), &k), None);
        let mut v6 = ready;
        v6["status"]["podIP"] = "fd00::5".into();
        assert_eq!(
            engine_url(&pod(v6), &k).as_deref(),
            Some("http://[fd00::5]:8000")
        );
    }

    #[test]
    fn a_service_is_an_engine_by_its_dns_name() {
        let k = settings(K8sDiscoveryType::ServiceName);
        let svc = pod(serde_json::json!({
            "metadata": {"name": "llama-engine", "resourceVersion": "3"},
            "spec": {"ports": [{"port": 80}]}, "status": {"loadBalancer": {}}
        }));
        assert_eq!(
            engine_url(&svc, &k).as_deref(),
            Some("http://llama-engine.ns.svc:8000")
        );
        let gone = pod(serde_json::json!({
            "metadata": {"name": "x", "deletionTimestamp": "2025-01-01T00:00:00Z"}
        }));
        assert_eq!(engine_url(&gone, &k), None);
    }

    #[test]
    fn watch_events_parse_with_their_status() {
        let bookmark = br#"{"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":{"resourceVersion":"12345","creationTimestamp":null},"spec":{"containers":null},"status":{}}}"#;
        let ev: WatchEvent<'_> = serde_json::from_slice(bookmark).expect("bookmark");
        assert_eq!(ev.kind, "BOOKMARK");
        let obj: Object = serde_json::from_str(ev.object.get()).expect("object");
        assert_eq!(obj.metadata.resource_version.as_deref(), Some("12345"));
        let gone = br#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 1 (2)","reason":"Expired","code":410}}"#;
        let ev: WatchEvent<'_> = serde_json::from_slice(gone).expect("error");
        let s: ApiStatus = serde_json::from_str(ev.object.get()).expect("status");
        assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
    }
}
