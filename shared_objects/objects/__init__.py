"""Fleet's versioned objects, one module each; importing this package registers them all."""

from shared_objects.objects.block_device_mapping import (
    BlockDeviceMapping,
    BlockDeviceMappingList,
)
from shared_objects.objects.compute_node import ComputeNode, ComputeNodeList
from shared_objects.objects.flavor import Flavor, FlavorList
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.instance_action import InstanceAction, InstanceActionList
from shared_objects.objects.instance_action_event import (
    InstanceActionEvent,
    InstanceActionEventList,
)
from shared_objects.objects.instance_fault import InstanceFault, InstanceFaultList
from shared_objects.objects.live_migrate_data import LiveMigrateData
from shared_objects.objects.migration import Migration, MigrationList
from shared_objects.objects.security_group import SecurityGroup, SecurityGroupList
from shared_objects.objects.security_group_rule import (
    SecurityGroupRule,
    SecurityGroupRuleList,
)
from shared_objects.objects.service import Service, ServiceList

__all__ = [
    "BlockDeviceMapping",
    "BlockDeviceMappingList",
    "ComputeNode",
    "ComputeNodeList",
    "Flavor",
    "FlavorList",
    "Instance",
    "InstanceAction",
    "InstanceActionEvent",
    "InstanceActionEventList",
    "InstanceActionList",
    "InstanceFault",
    "InstanceFaultList",
    "InstanceList",
    "LiveMigrateData",
    "Migration",
    "MigrationList",
    "SecurityGroup",
    "SecurityGroupList",
    "SecurityGroupRule",
    "SecurityGroupRuleList",
    "Service",
    "ServiceList",
]
