//! cooper: a cost-optimal node provisioner for Kubernetes clusters that run AI/ML work.
//!
//! The library is the pure core shared by the in-cluster controller, the dry-run
//! simulator and the cost report: parse inputs at the edge into integer units
//! ([`quantity`], [`resources`], [`workload`], [`nodepool`], [`catalog`]), then
//! [`planner::plan`] decides which nodes to launch.

pub mod aws;
pub mod catalog;
pub mod cloud;
pub mod consolidation;
pub mod controller;
pub mod crd;
pub mod cron;
pub mod disruption;
pub mod drift;
pub mod labels;
pub mod manifest;
pub mod mix;
pub mod nodepool;
pub mod planner;
pub mod provisioning;
pub mod quantity;
pub mod report;
pub mod resources;
pub mod scheduling;
pub mod sim;
pub mod table;
pub mod workload;
