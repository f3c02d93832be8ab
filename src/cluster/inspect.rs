//! Reads what `doctor` checks from the live cluster: the registration, the Service it calls and
//! the Deployments beside it, the policy the webhook runs (the ConfigMap key its Deployment
//! mounts), and in each namespace the outpost Services, every Deployment, Pod and
//! `EndpointSlice`, the Secrets the outposts' env names, and what a no-op dry-run PATCH of each
//! outpost object returns.
//!
//! Network I/O: reads, and `PATCH`es with `dryRun=All` that change nothing (the apiserver runs
//! admission on them and stores nothing). Secret data is turned into SHA-256 digests by key as
//! soon as it arrives, so no value is held past this module. The checks are the core's
//! (`core::doctor`).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    apps::v1::Deployment,
    core::v1::{ConfigMap, Namespace, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ListParams, LogParams, Patch, PatchParams, TypeMeta},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

use crate::{
    core::{
        cluster::{deployment_selector, secret_digests},
        doctor::{DryRun, Inputs, PolicyRef, PolicySource, locate_policy, selected_pods},
        mutate::{ObjectKind, identify_outpost, outpost_container},
        policy::{Policy, PolicyError},
    },
    k8s::{MANAGED_BY, MANAGED_BY_AUTHENTIK},
};

/// What to read.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The namespaces whose outposts are checked.
    pub namespaces: Vec<String>,
    /// The MutatingWebhookConfiguration's name.
    pub registration: String,
    /// `--policy`: judge against this one, and do not look for the webhook's.
    pub policy: Option<Policy>,
    /// Read the start of each outpost pod's log.
    pub logs: bool,
}

/// What `gather` read, and the policy to judge it against (`inputs.policy_source` says which).
#[derive(Debug, Clone)]
pub struct Gathered {
    pub inputs: Inputs,
    pub policy: Policy,
}

/// How long the first request may take: an apiserver that does not answer it is unreachable.
pub const FIRST_ANSWER: Duration = Duration::from_secs(8);

/// How much of a pod's log is read: its start, where the outpost says its mode and backend.
const LOG_BYTES: i64 = 64 * 1024;

/// Why `doctor` cannot run. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("cannot reach the apiserver: {0}")]
    Unreachable(String),
    #[error(
        "the apiserver does not accept these credentials (401): log in again, or check the \
         kubeconfig's user"
    )]
    Unauthorized,
    #[error("cannot read the apiserver's answer to `{verb} {resource}`: {message}")]
    Answer {
        verb: &'static str,
        resource: &'static str,
        message: String,
    },
    #[error(
        "the apiserver refuses `{verb} {resource}`{}: doctor needs it (read-only, plus a dry-run \
         patch); ask for a Role that allows it",
        in_namespace(.namespace.as_deref())
    )]
    Forbidden {
        verb: &'static str,
        resource: &'static str,
        namespace: Option<String>,
    },
    #[error("the built-in policy")]
    BuiltinPolicy(#[source] PolicyError),
    #[error("the apiserver answered `{verb} {resource}`{} with {code}: {message}", in_namespace(.namespace.as_deref()))]
    Api {
        verb: &'static str,
        resource: &'static str,
        namespace: Option<String>,
        code: u16,
        message: String,
    },
}

fn in_namespace(namespace: Option<&str>) -> String {
    namespace.map_or_else(String::new, |ns| format!(" in namespace {ns}"))
}

/// One request, as it is named in errors.
#[derive(Debug, Clone, Copy)]
struct What<'a> {
    verb: &'static str,
    resource: &'static str,
    namespace: Option<&'a str>,
}

impl What<'_> {
    fn error(self, e: kube::Error) -> InspectError {
        let namespace = self.namespace.map(str::to_owned);
        match e {
            kube::Error::Api(s) if s.code == 401 => InspectError::Unauthorized,
            kube::Error::Api(s) if s.code == 403 => InspectError::Forbidden {
                verb: self.verb,
                resource: self.resource,
                namespace,
            },
            kube::Error::Api(s) => InspectError::Api {
                verb: self.verb,
                resource: self.resource,
                namespace,
                code: s.code,
                message: s.message.clone(),
            },
            kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::HttpError(_) => {
                InspectError::Unreachable(crate::core::one_line(&error_chain(&e)))
            }
            other => InspectError::Answer {
                verb: self.verb,
                resource: self.resource,
                message: crate::core::one_line(&error_chain(&other)),
            },
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn to_values<K: Serialize>(objects: impl IntoIterator<Item = K>) -> Vec<Value> {
    objects
        .into_iter()
        .filter_map(|o| serde_json::to_value(o).ok())
        .collect()
}

async fn get<K>(api: &Api<K>, name: &str, what: What<'_>) -> Result<Option<Value>, InspectError>
where
    K: Clone + DeserializeOwned + std::fmt::Debug + Serialize,
{
    let object = api.get_opt(name).await.map_err(|e| what.error(e))?;
    Ok(object.and_then(|o| serde_json::to_value(o).ok()))
}

async fn list<K>(
    api: &Api<K>,
    params: &ListParams,
    what: What<'_>,
) -> Result<Vec<Value>, InspectError>
where
    K: Clone + DeserializeOwned + std::fmt::Debug + Serialize,
{
    let list = api.list(params).await.map_err(|e| what.error(e))?;
    Ok(to_values(list.items))
}

/// Services and Deployments are read untyped: the dry run's answer is compared with what is
/// stored, and a typed round trip would drop the fields k8s-openapi does not know.
fn untyped<K: kube::Resource<DynamicType = ()>>(
    client: &Client,
    namespace: &str,
) -> (Api<DynamicObject>, ApiResource) {
    let resource = ApiResource::erase::<K>(&());
    (
        Api::namespaced_with(client.clone(), namespace, &resource),
        resource,
    )
}

/// `object` as JSON, with the `apiVersion` and `kind` a list's items leave out.
fn untyped_value(mut object: DynamicObject, resource: &ApiResource) -> Option<Value> {
    object.types.get_or_insert_with(|| TypeMeta {
        api_version: resource.api_version.clone(),
        kind: resource.kind.clone(),
    });
    serde_json::to_value(object).ok()
}

async fn list_untyped(
    (api, resource): &(Api<DynamicObject>, ApiResource),
    params: &ListParams,
    what: What<'_>,
) -> Result<Vec<Value>, InspectError> {
    let list = api.list(params).await.map_err(|e| what.error(e))?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|o| untyped_value(o, resource))
        .collect())
}

/// Reads everything `doctor` checks. `now` and the expected registration are the caller's.
///
/// # Errors
/// When the apiserver cannot be reached within [`FIRST_ANSWER`], or refuses a read or the dry
/// run (naming the verb and resource).
pub async fn gather(client: &Client, scope: &Scope) -> Result<Gathered, InspectError> {
    let mut inputs = Inputs {
        registration_name: scope.registration.clone(),
        namespaces: scope.namespaces.clone(),
        ..Inputs::default()
    };
    let registrations = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let what = What {
        verb: "get",
        resource: "mutatingwebhookconfigurations",
        namespace: None,
    };
    inputs.registration =
        tokio::time::timeout(FIRST_ANSWER, get(&registrations, &scope.registration, what))
            .await
            .map_err(|_| {
                InspectError::Unreachable(format!("no answer within {} s", FIRST_ANSWER.as_secs()))
            })??;

    if let Some((namespace, name)) = webhook_service(inputs.registration.as_ref()) {
        webhook(client, scope, &mut inputs, &namespace, &name).await?;
    }
    let (policy, source) = if let Some(policy) = &scope.policy {
        let path = policy.source().to_owned();
        (policy.clone(), PolicySource::Flag { path })
    } else {
        in_force(client, &inputs).await?
    };
    inputs.policy_source = Some(source);

    for ns in &scope.namespaces {
        let at = |verb, resource| What {
            verb,
            resource,
            namespace: Some(ns),
        };
        let outposts =
            ListParams::default().labels(&format!("{MANAGED_BY}={MANAGED_BY_AUTHENTIK}"));
        let all = ListParams::default();
        // The namespace's labels, for the registration's namespaceSelector, and whether it
        // exists: a list in a namespace that does not is just empty. Optional: a caller who may
        // not read Namespaces gets every other check.
        let namespaces = Api::<Namespace>::all(client.clone());
        match namespaces.get_opt(ns).await {
            Ok(Some(namespace)) => {
                inputs
                    .namespace_labels
                    .insert(ns.clone(), namespace.metadata.labels.unwrap_or_default());
            }
            Ok(None) => {
                inputs.absent_namespaces.insert(ns.clone());
                continue;
            }
            Err(kube::Error::Api(s)) if s.code == 403 => {}
            Err(e) => return Err(at("get", "namespaces").error(e)),
        }
        let services = untyped::<Service>(client, ns);
        inputs
            .services
            .extend(list_untyped(&services, &outposts, at("list", "services")).await?);
        let deployments = untyped::<Deployment>(client, ns);
        inputs
            .deployments
            .extend(list_untyped(&deployments, &all, at("list", "deployments")).await?);
        let pods = Api::<Pod>::namespaced(client.clone(), ns);
        inputs
            .pods
            .extend(list(&pods, &all, at("list", "pods")).await?);
        let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns);
        inputs
            .endpoint_slices
            .extend(list(&slices, &all, at("list", "endpointslices")).await?);

        let secrets = Api::<Secret>::namespaced(client.clone(), ns);
        for name in secret_names(&policy.secret_names(), &inputs.deployments, ns) {
            let what = at("get", "secrets");
            let secret = get(&secrets, &name, what).await?;
            // Digests only, from here on.
            inputs
                .secrets
                .insert((ns.clone(), name), secret.as_ref().map(secret_digests));
        }
    }

    inputs.events = events(client, &scope.namespaces).await;
    dry_runs(client, &mut inputs).await?;
    if scope.logs {
        inputs.logs = Some(logs(client, &inputs).await?);
    }
    Ok(Gathered { inputs, policy })
}

/// The Events outpost-webhook left in `namespaces`. Optional: a caller who may not list events
/// gets every other check, and no Event lines.
async fn events(client: &Client, namespaces: &[String]) -> Option<Vec<Value>> {
    let mut out = Vec::new();
    for ns in namespaces {
        let api = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns);
        match api.list(&ListParams::default()).await {
            Ok(list) => out.extend(to_values(list.items)),
            Err(_) => return None,
        }
    }
    Some(out)
}

/// The Service the registration calls, its `EndpointSlice`s, and the Deployments beside it: which
/// of them runs the webhook's pods, and so mounts its policy.
async fn webhook(
    client: &Client,
    scope: &Scope,
    inputs: &mut Inputs,
    namespace: &str,
    name: &str,
) -> Result<(), InspectError> {
    let at = |verb, resource| What {
        verb,
        resource,
        namespace: Some(namespace),
    };
    let api = Api::<Service>::namespaced(client.clone(), namespace);
    inputs.webhook_service = get(&api, name, at("get", "services")).await?;
    if inputs.webhook_service.is_none() {
        return Ok(());
    }
    // A watched namespace's EndpointSlices are all read with its outposts.
    if !scope.namespaces.iter().any(|n| n == namespace) {
        let api = Api::<EndpointSlice>::namespaced(client.clone(), namespace);
        let params = ListParams::default().labels(&format!("kubernetes.io/service-name={name}"));
        inputs
            .endpoint_slices
            .extend(list(&api, &params, at("list", "endpointslices")).await?);
    }
    // Optional: without them doctor cannot tell which pods the Service reaches or which policy
    // they run, and says so; every other check still runs.
    let deployments = untyped::<Deployment>(client, namespace);
    match deployments.0.list(&ListParams::default()).await {
        Ok(list) => {
            inputs.webhook_deployments = Some(
                list.items
                    .into_iter()
                    .filter_map(|o| untyped_value(o, &deployments.1))
                    .collect(),
            );
        }
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        Err(e) => return Err(at("list", "deployments").error(e)),
    }
    Ok(())
}

/// The policy the webhook runs, and where it was found; the built-in policy, and why, when it
/// cannot be found.
async fn in_force(
    client: &Client,
    inputs: &Inputs,
) -> Result<(Policy, PolicySource), InspectError> {
    let builtin = |why: String| {
        Policy::builtin()
            .map(|p| (p, PolicySource::Fallback { why }))
            .map_err(InspectError::BuiltinPolicy)
    };
    let found = match locate_policy(inputs) {
        Err(why) => return builtin(why),
        Ok(found) => found,
    };
    let PolicyRef::ConfigMap {
        namespace,
        name,
        key,
        ..
    } = &found
    else {
        return Policy::builtin()
            .map(|p| (p, PolicySource::InForce(found.clone())))
            .map_err(InspectError::BuiltinPolicy);
    };
    let api = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let configmap = match api.get_opt(name).await {
        Ok(Some(c)) => c,
        Ok(None) => return builtin(format!("ConfigMap {namespace}/{name} does not exist")),
        // Optional, as `--policy` does without it.
        Err(kube::Error::Api(s)) if s.code == 403 => {
            return builtin(format!(
                "the apiserver refuses `get configmaps` in namespace {namespace}"
            ));
        }
        Err(e) => {
            return Err(What {
                verb: "get",
                resource: "configmaps",
                namespace: Some(namespace),
            }
            .error(e));
        }
    };
    let text = configmap
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|t| t.as_bytes().to_vec())
        .or_else(|| {
            configmap
                .binary_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|b| b.0.clone())
        });
    let Some(text) = text else {
        return builtin(format!("ConfigMap {namespace}/{name} has no key {key}"));
    };
    match Policy::from_bytes(&format!("ConfigMap {namespace}/{name} key {key}"), &text) {
        Ok(policy) => Ok((policy, PolicySource::InForce(found))),
        Err(e) => builtin(crate::core::one_line(&error_chain(&e))),
    }
}

/// The Service the first webhook calls, as (namespace, name).
fn webhook_service(registration: Option<&Value>) -> Option<(String, String)> {
    let service = registration?
        .get("webhooks")?
        .as_array()?
        .iter()
        .find_map(|w| w.pointer("/clientConfig/service"))?;
    let text = |k: &str| Some(service.get(k)?.as_str()?.to_owned());
    Some((text("namespace")?, text("name")?))
}

/// The policy's Secrets, and every Secret an outpost container's env or envFrom names.
fn secret_names(
    policy: &BTreeSet<String>,
    deployments: &[Value],
    namespace: &str,
) -> BTreeSet<String> {
    let mut names = policy.clone();
    for d in deployments {
        if d.pointer("/metadata/namespace").and_then(Value::as_str) != Some(namespace) {
            continue;
        }
        let Some(outpost) = identify_outpost(d) else {
            continue;
        };
        let containers = d
            .pointer("/spec/template/spec/containers")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let Some(container) = containers.get(outpost_container(containers, outpost.kind)) else {
            continue;
        };
        let refs = container
            .get("env")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|e| e.pointer("/valueFrom/secretKeyRef/name"))
            .chain(
                container
                    .get("envFrom")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.pointer("/secretRef/name")),
            );
        names.extend(refs.filter_map(Value::as_str).map(str::to_owned));
    }
    names
}

/// A no-op dry-run PATCH of each outpost object: the apiserver runs admission (this webhook) on
/// it as on any write, and answers with what it would store. The patch holds only the listed
/// `resourceVersion`, a precondition: a write in between (an HPA, the controller) is a conflict,
/// not a difference to blame on the webhook.
async fn dry_runs(client: &Client, inputs: &mut Inputs) -> Result<(), InspectError> {
    let params = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let objects: Vec<(ObjectKind, String, String, Option<String>)> = inputs
        .services
        .iter()
        .map(|s| (ObjectKind::Service, s))
        .chain(
            inputs
                .deployments
                .iter()
                .map(|d| (ObjectKind::Deployment, d)),
        )
        .filter(|(_, o)| identify_outpost(*o).is_some())
        .map(|(kind, o)| {
            let text = |p: &str| o.pointer(p).and_then(Value::as_str).map(str::to_owned);
            (
                kind,
                text("/metadata/namespace").unwrap_or_default(),
                text("/metadata/name").unwrap_or_default(),
                text("/metadata/resourceVersion"),
            )
        })
        .collect();
    for (kind, namespace, name, version) in objects {
        let (resource, api) = match kind {
            ObjectKind::Service => ("services", untyped::<Service>(client, &namespace)),
            ObjectKind::Deployment => ("deployments", untyped::<Deployment>(client, &namespace)),
        };
        let what = What {
            verb: "patch",
            resource,
            namespace: Some(&namespace),
        };
        let patch: Patch<Value> = Patch::Merge(match version {
            Some(v) => json!({"metadata": {"resourceVersion": v}}),
            None => json!({}),
        });
        let answer = match api.0.patch(&name, &params, &patch).await {
            Ok(o) => untyped_value(o, &api.1).map_or_else(
                || DryRun::Refused("the answer is not an object".into()),
                DryRun::Returned,
            ),
            Err(kube::Error::Api(s)) if s.code == 409 => DryRun::Conflict,
            // A webhook or admission policy that denies the write answers 403 too; that is a
            // finding about admission, not a permission doctor lacks.
            Err(kube::Error::Api(s)) if s.code == 403 && denied_by_admission(&s.message) => {
                DryRun::Refused(crate::core::one_line(&s.message))
            }
            Err(kube::Error::Api(s)) if s.code != 401 && s.code != 403 => {
                DryRun::Refused(crate::core::one_line(&s.message))
            }
            Err(e) => return Err(what.error(e)),
        };
        inputs.dry_runs.insert((kind, namespace, name), answer);
    }
    Ok(())
}

/// Whether a 403's message is admission's (a webhook, or a `ValidatingAdmissionPolicy`), not
/// RBAC's.
fn denied_by_admission(message: &str) -> bool {
    message.contains("admission webhook") || message.contains("ValidatingAdmissionPolicy")
}

/// The start of each outpost pod's log, from its outpost container.
async fn logs(
    client: &Client,
    inputs: &Inputs,
) -> Result<BTreeMap<(String, String), String>, InspectError> {
    let mut out = BTreeMap::new();
    for d in &inputs.deployments {
        let (Some(outpost), Some(selector)) = (identify_outpost(d), deployment_selector(d)) else {
            continue;
        };
        let namespace = d
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let api = Api::<Pod>::namespaced(client.clone(), namespace);
        for pod in selected_pods(&inputs.pods, namespace, &selector) {
            let containers = pod
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let container = containers
                .get(outpost_container(containers, outpost.kind))
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            let name = pod
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let params = LogParams {
                container,
                limit_bytes: Some(LOG_BYTES),
                ..LogParams::default()
            };
            match api.logs(name, &params).await {
                Ok(text) => {
                    out.insert((namespace.to_owned(), name.to_owned()), text);
                }
                // `limitBytes` may cut a character in two: keep what reads.
                Err(kube::Error::FromUtf8(e)) => {
                    let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
                    out.insert((namespace.to_owned(), name.to_owned()), text);
                }
                // A pod that has not started has no log yet: nothing to say of it.
                Err(kube::Error::Api(s)) if s.code != 401 && s.code != 403 => {}
                Err(e) => {
                    return Err(What {
                        verb: "get",
                        resource: "pods/log",
                        namespace: Some(namespace),
                    }
                    .error(e));
                }
            }
        }
    }
    Ok(out)
}
